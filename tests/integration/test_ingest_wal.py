"""Ingest with its write-ahead log against a real broker: a 202 means the events are in
the log and in Kafka; the log is trimmed by the group's committed offsets read from the
broker; a log that cannot be written answers 503 ``journal-unavailable``."""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import envelope, topics
from schemas.events import utcnow
from services.common import kafka
from services.common.auth import Authenticator
from services.common.settings import Settings
from services.ingest.app import Ingest, router
from services.ingest.publisher import Publisher
from services.ingest.wal.committed import CommittedOffsets
from services.ingest.wal.journal import Journal
from services.ingest.wal.segment import Record
from services.runtime import Component, http_app

HEADERS = {
    "Content-Type": "application/cloudevents-batch+json",
    "Authorization": "Bearer test-token",
}


def events(tenant: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "wal-tests",
            "type": "api_call",
            "subject": f"{tenant}-c{i % 3}",
            "time": utcnow().isoformat(),
            "data": {"endpoint": "/v1/x"},
        }
        for i in range(count)
    ]


@pytest.fixture
async def logged(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Journal]]:
    producer = await kafka.start_producer(settings.kafka_bootstrap_servers or "")
    journal = Journal.open(tmp_path / "wal", 2**20, 0.2).journal
    ingest = Ingest(settings, Publisher(producer, journal), Authenticator(settings, redis, pool))
    app = http_app([Component("ingest", [router(ingest)])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        yield http, journal
    await journal.close()
    await producer.stop()


async def test_a_202_means_in_the_log_and_trimmed_once_the_group_committed_past_it(
    logged: tuple[httpx.AsyncClient, Journal], settings: Settings, tenant: str, tmp_path: Path
) -> None:
    http, journal = logged
    sent = events(tenant, 12)
    reply = await http.post("/v1/events", content=orjson.dumps(sent), headers=HEADERS)
    assert reply.status_code == 202, reply.text
    kept = Journal.open(tmp_path / "wal", 2**20, 60).pending  # what a crash now would leave
    logged_ids = {i for _, records in kept for r in records for i in _ids(r.value)}
    assert logged_ids == {e["id"] for e in sent}

    bootstrap = settings.kafka_bootstrap_servers or ""
    committed = CommittedOffsets(bootstrap, settings.consumer_group)
    await committed.start()
    try:
        await journal.close()  # the active segment closed: only the count holds it now
        assert await journal.trim(await committed.events(journal.partitions())) == 0
        await _consume_and_commit(bootstrap, settings.consumer_group)
        assert await journal.trim(await committed.events(journal.partitions())) == 1
    finally:
        await committed.close()
    assert not list((tmp_path / "wal").iterdir())


async def test_a_request_whose_every_event_is_rejected_is_422_at_once_with_the_log(
    logged: tuple[httpx.AsyncClient, Journal], tenant: str
) -> None:
    """Nothing to log: the answer is the refusal, not a wait for a flush that never
    comes (it was a 503 broker-unavailable after the publish timeout)."""
    http, _ = logged
    bad = events(tenant, 2)
    for event in bad:
        event["id"] = "a\x00b"
    started = time.monotonic()
    reply = await http.post("/v1/events", content=orjson.dumps(bad), headers=HEADERS)
    assert reply.status_code == 422, reply.text
    assert time.monotonic() - started < 2


async def test_a_log_that_cannot_be_written_is_503_journal_unavailable(
    logged: tuple[httpx.AsyncClient, Journal], tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    http, _ = logged

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    reply = await http.post("/v1/events", content=orjson.dumps(events(tenant, 3)), headers=HEADERS)
    monkeypatch.undo()
    assert reply.status_code == 503, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["type"] == "https://tally.dev/problems/journal-unavailable"
    assert "none is reported accepted" in reply.json()["detail"]
    assert reply.headers["retry-after"] == "1"
    again = await http.post("/v1/events", content=orjson.dumps(events(tenant, 3)), headers=HEADERS)
    assert again.status_code == 202, again.text  # the log goes on in a new segment


def _ids(payload: bytes) -> list[str]:
    return [e.id for e in envelope.decode(payload)]


async def _consume_and_commit(bootstrap: str, group: str) -> None:
    """The aggregator's part: read the topic to its end as ``group``, commit."""
    consumer = AIOKafkaConsumer(
        topics.EVENTS,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=500)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while [tp for tp in ends if await consumer.position(tp) < ends[tp]]:
            await consumer.getmany(timeout_ms=500)
        await consumer.commit()
    finally:
        await consumer.stop()


async def test_the_replay_produce_reports_each_records_own_offset(settings: Settings) -> None:
    """Trimming trusts these offsets: each must be where its record really is."""
    producer = await kafka.start_producer(settings.kafka_bootstrap_servers or "")
    try:
        records = [
            Record(f"cust-{i % 7}".encode(), f"replayed-{uuid.uuid4().hex}".encode())
            for i in range(3000)
        ]
        offsets = await Publisher(producer).produce_in_batches(records)
    finally:
        await producer.stop()
    assert len(offsets) == len(records)
    where = dict(zip([r.value for r in records], offsets, strict=True))
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        partitions = sorted({p for p, _ in offsets})
        found: dict[bytes, tuple[int, int]] = {}
        for partition in partitions:
            tp = TopicPartition(topics.EVENTS, partition)
            consumer.assign([tp])
            low = min(o for p, o in offsets if p == partition)
            high = max(o for p, o in offsets if p == partition)
            consumer.seek(tp, low)
            while await consumer.position(tp) <= high:
                for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    if record.value in where:
                        found[record.value] = (partition, record.offset)
    finally:
        await consumer.stop()
    assert found == where
