"""The SDK's emitter against the real ingest service: batching, flushing, retries,
the bounded buffer and per-event rejections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from tally_sdk import Backoff, BufferFull, ClientClosed, Outcome, Tally, Undelivered

from schemas import envelope, topics
from services.common.broker import free_port
from services.common.settings import Settings
from tests.conftest import env_for
from tests.support import TallyProcess

pytestmark = pytest.mark.slow
FAST = Backoff(initial=0.05, maximum=0.5)


@pytest.fixture
def ingest(settings: Settings, tmp_path: Path) -> Iterator[TallyProcess]:
    process = TallyProcess(["ingest"], env_for(settings), tmp_path / "ingest.log").start()
    yield process
    process.stop()


@pytest.fixture
def reports() -> list[Undelivered]:
    return []


def client(url: str, reports: list[Undelivered], **options: Any) -> Tally:
    """A client with a source of its own, so its events are told apart in Kafka."""
    return Tally(
        url,
        "test-token",
        source=f"sdk-test-{uuid.uuid4().hex[:8]}",
        backoff=FAST,
        on_undelivered=reports.append,
        **options,
    )


async def test_many_emits_travel_in_few_requests(
    ingest: TallyProcess, tenant: str, reports: list[Undelivered]
) -> None:
    async with client(ingest.url, reports, max_batch=100, max_delay=5) as tally:
        for n in range(250):
            tally.emit("api_call", f"{tenant}-acme", endpoint="/v1/search", n=n)
        await tally.flush()
        assert (tally.stats.accepted, tally.stats.requests) == (250, 3)
        assert tally.stats.pending == 0 and not reports


async def test_a_partial_batch_leaves_after_max_delay_without_a_flush(
    ingest: TallyProcess, tenant: str, reports: list[Undelivered]
) -> None:
    async with client(ingest.url, reports, max_delay=0.2) as tally:
        for _ in range(3):
            tally.emit("api_call", f"{tenant}-acme")
        await eventually(lambda: tally.stats.accepted == 3)
        assert tally.stats.requests == 1


async def test_aclose_sends_everything_still_buffered(
    ingest: TallyProcess, tenant: str, reports: list[Undelivered]
) -> None:
    tally = client(ingest.url, reports, max_delay=60)
    for _ in range(1200):
        tally.emit("compute", f"{tenant}-acme", "0.25")
    await tally.aclose()
    assert tally.stats.accepted == 1200 and tally.stats.pending == 0 and not reports
    with pytest.raises(ClientClosed):
        tally.emit("compute", f"{tenant}-acme")


async def test_events_wait_for_ingest_and_keep_their_ids(
    settings: Settings, tmp_path: Path, tenant: str, reports: list[Undelivered]
) -> None:
    """Emitted while nothing listens (connection refused), delivered once ingest is up:
    each event exactly once, under the id it got when emitted."""
    later = TallyProcess(["ingest"], env_for(settings), tmp_path / "ingest.log")
    since = await _end_offsets(settings)
    tally = client(later.url, reports)
    try:
        ids = {tally.emit("api_call", f"{tenant}-acme", endpoint="/v1/x") for _ in range(20)}
        await eventually(lambda: tally.stats.retries >= 2)
        assert tally.stats.accepted == 0
        await asyncio.to_thread(later.start)
        async with asyncio.timeout(30):
            await tally.flush()
    finally:
        await tally.aclose()
        later.stop()
    assert tally.stats.accepted == 20 and not reports
    stored = await _events_since(settings, since, tally.source)
    assert sorted(stored) == sorted(ids)


async def test_a_full_buffer_refuses_new_events_by_default(
    ingest: TallyProcess, tenant: str, reports: list[Undelivered]
) -> None:
    async with client(ingest.url, reports, max_buffer=5) as tally:
        for _ in range(5):
            tally.emit("api_call", f"{tenant}-acme")
        with pytest.raises(BufferFull):
            tally.emit("api_call", f"{tenant}-acme")
        await tally.flush()
        tally.emit("api_call", f"{tenant}-acme")  # room again
    assert tally.stats.emitted == tally.stats.accepted == 6 and not reports


async def test_drop_oldest_makes_room_and_reports_what_it_dropped(
    ingest: TallyProcess, tenant: str, reports: list[Undelivered]
) -> None:
    async with client(ingest.url, reports, max_buffer=5, overflow="drop_oldest") as tally:
        ids = [tally.emit("api_call", f"{tenant}-acme") for _ in range(8)]
    assert [(r.event["id"], r.outcome) for r in reports] == [(i, Outcome.DROPPED) for i in ids[:3]]
    assert (tally.stats.accepted, tally.stats.dropped) == (5, 3)


async def test_rejected_events_are_reported_with_their_reasons(
    ingest: TallyProcess, tenant: str, reports: list[Undelivered]
) -> None:
    async with client(ingest.url, reports) as tally:
        tally.emit("api_call", f"{tenant}-acme")
        bad_subject = tally.emit("api_call", "not a customer id")
        bad_value = tally.emit("storage", f"{tenant}-acme", "lots")
        await tally.flush()
        only_bad = tally.emit("api_call", "")  # a batch of rejects: ingest answers 422
    assert (tally.stats.accepted, tally.stats.rejected) == (1, 3)
    found = {r.event["id"]: (r.status, r.errors[0]["field"]) for r in reports}
    assert found == {
        bad_subject: (202, "subject"),
        bad_value: (202, "data.value"),
        only_bad: (422, "subject"),
    }
    assert all(r.outcome is Outcome.REJECTED for r in reports)


async def test_a_refused_batch_is_reported_and_not_retried(
    ingest: TallyProcess, tenant: str, reports: list[Undelivered]
) -> None:
    async with Tally(ingest.url, "wrong-token", on_undelivered=reports.append) as tally:
        tally.emit("api_call", f"{tenant}-acme")
        tally.emit("api_call", f"{tenant}-acme")
    assert (tally.stats.refused, tally.stats.requests, tally.stats.retries) == (2, 1, 0)
    assert {r.status for r in reports} == {401}
    assert reports[0].problem is not None and reports[0].problem["status"] == 401


async def test_aclose_gives_up_on_an_unreachable_tally_and_reports_the_rest(
    reports: list[Undelivered],
) -> None:
    tally = client(f"http://127.0.0.1:{free_port()}", reports, close_timeout=0.5)
    ids = [tally.emit("api_call", "acme") for _ in range(3)]
    await tally.aclose()
    assert [(r.event["id"], r.outcome) for r in reports] == [(i, Outcome.ABANDONED) for i in ids]
    assert tally.stats.retries > 0 and tally.stats.pending == 0


async def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still false after {seconds}s")


async def _end_offsets(settings: Settings) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topics.EVENTS) or set()
        offsets = await consumer.end_offsets([TopicPartition(topics.EVENTS, p) for p in partitions])
        return dict(offsets)
    finally:
        await consumer.stop()


async def _events_since(
    settings: Settings, since: dict[TopicPartition, int], source: str
) -> list[str]:
    """The ids of ``source``'s events written to the events topic after ``since``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        consumer.assign(list(since))
        for partition, offset in since.items():
            consumer.seek(partition, offset)
        ends = await consumer.end_offsets(list(since))
        ids: list[str] = []
        while [p for p in since if await consumer.position(p) < ends[p]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    stored = envelope.decode(record.value or b"")
                    ids += [e.id for e in stored if e.source == source]
        return ids
    finally:
        await consumer.stop()
