"""The events topic is recreated under a running aggregator: nothing goes uncounted.

The embedded broker keeps its topics in memory, so a restart of it (or deleting and
creating ``tally.events`` on Kafka) starts every partition's offsets again at 0 while
Redis still holds the offsets applied from the topic's previous life.  The aggregator
must count the new topic's records, not take them for replays of the old one.
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas.events import UsageEvent, utcnow
from services.common import kafka, topic_ids
from services.common.broker import EmbeddedBroker
from services.common.settings import Settings
from services.ingest.publisher import Publisher
from tests.conftest import PARTITIONS, env_for
from tests.support import TallyProcess, wait_for
from tests.workload import Key, expected, generate, live_counters


async def test_a_topic_id_names_one_life_of_the_topic(kafka_bootstrap: str, tenant: str) -> None:
    name = f"tally.test.{tenant}"
    await _create(kafka_bootstrap, name)
    first = await topic_ids.topic_ids(kafka_bootstrap, [name])
    assert first[name] != topic_ids.NO_ID
    assert await topic_ids.topic_ids(kafka_bootstrap, [name]) == first  # stable while it lives
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([name])
    finally:
        await admin.close()
    await _create(kafka_bootstrap, name)
    second = await topic_ids.topic_ids(kafka_bootstrap, [name])
    assert second[name] not in (first[name], topic_ids.NO_ID)
    with pytest.raises(topic_ids.TopicIdError, match=f"'{name}.never' does not exist"):
        await topic_ids.topic_ids(kafka_bootstrap, [f"{name}.never"])


async def _create(bootstrap: str, name: str) -> None:
    """Create a topic, waiting out the deletion of an earlier one of that name (Kafka)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for _ in range(100):
            try:
                await admin.create_topics([NewTopic(name, 1, 1)])
                return
            except TopicAlreadyExistsError:
                await asyncio.sleep(0.1)
        raise AssertionError(f"topic {name} was not deleted")
    finally:
        await admin.close()


@pytest.mark.slow
def test_a_restarted_broker_loses_no_counts(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    work = generate(tenant, customers=12, events=6_000, now=utcnow(), invalid_share=0, seed=21)
    stream = [*work.valid, *work.duplicates]
    random.Random(4).shuffle(stream)
    # The second life of the topic gets fewer records than the first: all of its
    # offsets fall below the ones applied before the restart.
    before, after = stream[:3_600], stream[3_600:]
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    aggregator: TallyProcess | None = None
    try:
        bootstrap = _start(broker)
        env = env_for(settings) | {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}
        aggregator = TallyProcess(["aggregator"], env, tmp_path / "agg.log").start()
        asyncio.run(_publish(bootstrap, before))
        first = _counters(before)
        wait_for(
            lambda: live_counters(settings.redis_url, first) == first,
            120,
            "first life",
            aggregator.tail,
        )

        broker.stop()  # the memory store goes with it
        broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "tansu.log")
        _start(broker)
        asyncio.run(_publish(bootstrap, after))
        want = _counters(stream)
        assert want != first
        wait_for(
            lambda: live_counters(settings.redis_url, want) == want,
            120,
            "both lives",
            lambda: _shortfall(live_counters(settings.redis_url, want), want),
        )
    finally:
        if aggregator is not None:
            aggregator.stop()
        broker.stop()


def _start(broker: EmbeddedBroker) -> str:
    """Start the broker and create the topics, as ``tally up`` does."""
    broker.start()
    asyncio.run(kafka.ensure_topics(broker.bootstrap_servers, PARTITIONS))
    return broker.bootstrap_servers


async def _publish(bootstrap: str, events: list[dict[str, Any]]) -> None:
    producer = await kafka.start_producer(bootstrap)
    publisher = Publisher(producer)
    parsed = [UsageEvent.model_validate(e) for e in events]
    try:
        for start in range(0, len(parsed), 200):
            await publisher.publish(parsed[start : start + 200], utcnow())
    finally:
        await producer.stop()


def _counters(events: list[dict[str, Any]]) -> dict[Key, Decimal]:
    """Daily api_calls and compute_seconds per customer over the distinct events."""
    distinct = list({(e["source"], e["id"]): e for e in events}.values())
    cells = expected(distinct, lambda t: datetime.date(t))
    return {
        k: v for k, v in cells.items() if k[1] in ("api_calls", "compute_seconds") and k[3] == "*"
    }


def _shortfall(found: dict[Key, Decimal], want: dict[Key, Decimal]) -> str:
    calls = [k for k in want if k[1] == "api_calls"]
    counted, sent = sum(found[k] for k in calls), sum(want[k] for k in calls)
    return f"api_calls counted {counted} of {sent}"
