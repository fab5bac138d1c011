"""Two aggregator workers in one consumer group share the partitions, and the numbers
still come out exact: the way Tally scales from one process to a fleet."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from schemas.events import UsageEvent, utcnow
from services.common import kafka
from services.common.settings import Settings
from services.ingest.publisher import Publisher
from tests.conftest import env_for
from tests.support import TallyProcess, wait_for
from tests.workload import generate, live_counters

pytestmark = pytest.mark.slow


def test_two_workers_share_the_partitions_exactly(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    work = generate(tenant, customers=16, events=6_000, now=utcnow(), invalid_share=0, seed=11)
    env = env_for(settings)
    workers = []
    for name in ("a", "b"):
        # chDB allows one process per path: each worker gets its own data dir here.
        worker_env = env | {"TALLY_DATA_DIR": str(tmp_path / name)}
        workers.append(TallyProcess(["aggregator"], worker_env, tmp_path / f"{name}.log").start())
    try:
        events = [UsageEvent.model_validate(e) for e in work.valid + work.duplicates]
        asyncio.run(_publish(settings.kafka_bootstrap_servers or "", events))
        want = {k: v for k, v in work.daily.items() if k[1] == "api_calls" and k[3] == "*"}
        wait_for(
            lambda: live_counters(settings.redis_url, want) == want,
            120,
            "exact counts",
            workers[1].tail,
        )
        assert all(_counted_by(worker) > 0 for worker in workers), "one worker did nothing"
    finally:
        for worker in workers:
            worker.stop()


async def _publish(bootstrap: str, events: list[UsageEvent]) -> None:
    producer = await kafka.start_producer(bootstrap)
    try:
        for start in range(0, len(events), 500):
            await Publisher(producer).publish(events[start : start + 500], utcnow())
    finally:
        await producer.stop()


def _counted_by(worker: TallyProcess) -> float:
    text = httpx.get(f"{worker.url}/metrics", timeout=5).text
    match = re.search(r'^tally_aggregator_events_total\{outcome="counted"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0
