"""kill -9 the aggregator mid-stream, restart it: the numbers are exactly right.

Envelopes are produced while a ``tally aggregator`` process consumes them; it is
killed outright twice along the way (no flush, no offset commit) and started again.
Redis counters, the ClickHouse rows and the rollups must equal what the test computed
on its own — nothing lost, nothing counted twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from psycopg_pool import AsyncConnectionPool

from schemas import redis_keys
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
