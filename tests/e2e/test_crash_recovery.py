"""kill -9 the aggregator mid-stream, restart it: the numbers are exactly right.

Envelopes are produced while a ``tally aggregator`` process consumes them; it is
killed outright twice along the way (no flush, no offset commit) and started again.
Redis counters, the ClickHouse rows and the rollups must equal what the test computed
on its own — nothing lost, nothing counted twice.  And one killed while the rows it
counted wait to be inserted has committed none of their records.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg_pool import AsyncConnectionPool

from schemas import redis_keys, topics
from schemas.events import UsageEvent, from_micros, utcnow
from schemas.windows import Window
from services.billing.rollup.job import Rollup
from services.common import clickhouse, kafka
from services.common.settings import Settings
from services.ingest.publisher import Publisher
from tests.conftest import env_for
from tests.support import TallyProcess, wait_for
from tests.workload import Workload, generate, rollup_cells, stored_totals

pytestmark = pytest.mark.slow


def test_kill_minus_nine_loses_nothing_and_counts_nothing_twice(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    now = utcnow()
    work = generate(tenant, customers=20, events=24_000, now=now, invalid_share=0, seed=5)
    stream = [UsageEvent.model_validate(e) for e in work.valid + work.duplicates]
    random.Random(3).shuffle(stream)
    expected_calls = _api_calls_today(work.valid, now)

    aggregator = TallyProcess(["aggregator"], env_for(settings), tmp_path / "agg.log").start()
    producing = _Producer(settings.kafka_bootstrap_servers or "", stream)
    try:
        for _ in range(2):
            wait_for(
                lambda: sum(_redis_calls(settings, expected_calls).values()) > 0,
                60,
                "some events counted",
                aggregator.tail,
            )
            aggregator.kill()
            aggregator.start()
        producing.join()
        wait_for(
            lambda: _redis_calls(settings, expected_calls) == expected_calls,
            120,
            "exact Redis counters after restarts",
            aggregator.tail,
        )
    finally:
        aggregator.stop()
    asyncio.run(_check_clickhouse_and_rollups(settings, work))


def test_records_are_committed_only_once_their_rows_are_in_clickhouse(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    """Counted in Redis is not yet stored: rows wait to be inserted with those of later
    batches.  An aggregator whose rows wait (for an hour here) and which is killed has
    committed none of their records, so the next one reads them again, skips them in
    Redis and inserts them."""
    now = utcnow()
    work = generate(tenant, customers=5, events=2_000, now=now, invalid_share=0, seed=8)
    expected_calls = _api_calls_today(work.valid, now)
    waiting = {
        "TALLY_AGGREGATOR_INSERT_SECONDS": "3600",
        "TALLY_AGGREGATOR_INSERT_ROWS": "9000000",
        "TALLY_INGEST_MAX_LAG_SECONDS": "0",  # it would read the hour as lag
    }
    log = tmp_path / "agg.log"
    aggregator = TallyProcess(["aggregator"], env_for(settings) | waiting, log).start()
    try:
        stream = [UsageEvent.model_validate(e) for e in work.valid + work.duplicates]
        _Producer(settings.kafka_bootstrap_servers or "", stream).join()
        wait_for(
            lambda: _redis_calls(settings, expected_calls) == expected_calls,
            60,
            "every event counted",
            aggregator.tail,
        )
        time.sleep(2.5)  # past the commit interval (1 s) twice
        assert asyncio.run(_committed(settings)) == {}
    finally:
        aggregator.kill()
    aggregator = TallyProcess(["aggregator"], env_for(settings), log).start()
    try:
        wait_for(
            lambda: asyncio.run(_committed(settings)) == asyncio.run(_ends(settings)),
            60,
            "the records committed once inserted",
            aggregator.tail,
        )
    finally:
        aggregator.stop()
    assert _redis_calls(settings, expected_calls) == expected_calls
    client = clickhouse.connect(settings)
    try:
        assert stored_totals(client, work.tenant) == work.totals()
    finally:
        client.close()


async def _committed(settings: Settings) -> dict[int, int]:
    """The aggregator's group's committed offset of each partition that has one."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=settings.consumer_group
    )
    await consumer.start()
    try:
        found = {}
        for partition in range(settings.events_partitions):
            offset = await consumer.committed(TopicPartition(topics.EVENTS, partition))
            if offset is not None:
                found[partition] = offset
        return found
    finally:
        await consumer.stop()


async def _ends(settings: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        partitions = [TopicPartition(topics.EVENTS, p) for p in range(settings.events_partitions)]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items() if offset}
    finally:
        await consumer.stop()


def _api_calls_today(valid: list[dict[str, Any]], now: datetime) -> dict[str, Decimal]:
    today = now.date()
    counts: dict[str, Decimal] = defaultdict(Decimal)
    for event in valid:
        if event["type"] == "api_call" and datetime.fromisoformat(event["time"]).date() == today:
            counts[event["subject"]] += 1
    return dict(counts)


def _redis_calls(settings: Settings, expected: dict[str, Decimal]) -> dict[str, Decimal]:
    client = redis.Redis.from_url(settings.redis_url)
    bucket = utcnow().strftime("%Y%m%d")
    found = {}
    for customer in expected:
        raw = client.hget(
            redis_keys.counters(customer, "api_calls", Window.DAY, bucket), redis_keys.TOTAL
        )
        found[customer] = from_micros(int(raw or 0))
    client.close()
    return found


class _Producer:
    """Publishes the stream in small requests' worth of envelopes from a thread."""

    def __init__(self, bootstrap: str, events: list[UsageEvent]) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(bootstrap, events),))
        self._thread.start()

    async def _run(self, bootstrap: str, events: list[UsageEvent]) -> None:
        producer = await kafka.start_producer(bootstrap)
        publisher = Publisher(producer)
        try:
            for start in range(0, len(events), 200):
                await publisher.publish(events[start : start + 200], utcnow())
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()

    def join(self) -> None:
        self._thread.join(120)


async def _check_clickhouse_and_rollups(settings: Settings, work: Workload) -> None:
    client = clickhouse.connect(settings)
    try:
        assert stored_totals(client, work.tenant) == work.totals()
        async with AsyncConnectionPool(settings.database_url, open=False) as pool:
            first = (utcnow() - timedelta(days=2)).date()
            await Rollup(client, pool, timedelta(0)).run_range(first, utcnow().date())
    finally:
        client.close()
    assert rollup_cells(settings.database_url, "usage_daily", work.tenant) == work.daily
