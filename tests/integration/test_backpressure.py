"""Backpressure against a real broker: ingest answers 503 ``overloaded`` while the
aggregator's consumer group is behind, and accepts again once it has caught up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import topics
from services.common import kafka
from services.common.auth import Authenticator
from services.common.settings import Settings
from services.ingest.app import Ingest, router
from services.ingest.backpressure import Backpressure
from services.ingest.publisher import Publisher
from services.runtime import Component, http_app
from tests.integration.test_ingest_http import BATCH, event, problem

BOUND_SECONDS = 1.0


@pytest.fixture
async def group(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer group that has caught up once and then consumes nothing: an
    aggregator that stopped counting."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=f"stalled-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
    )
    await consumer.start()
    await commit_to_end(consumer)
    yield consumer
    await consumer.stop()


async def commit_to_end(consumer: AIOKafkaConsumer) -> None:
    partitions = [
        TopicPartition(topics.EVENTS, p) for p in consumer.partitions_for_topic(topics.EVENTS) or ()
    ]
    assert partitions
    if not consumer.assignment():
        consumer.assign(partitions)
    await consumer.commit(dict(await consumer.end_offsets(partitions)))


async def test_ingest_refuses_while_the_group_is_behind_and_accepts_once_it_commits(
    settings: Settings,
    redis: Redis,
    pool: AsyncConnectionPool,
    tenant: str,
    group: AIOKafkaConsumer,
) -> None:
    bootstrap = settings.kafka_bootstrap_servers or ""
    guard = Backpressure(bootstrap, group._group_id or "", BOUND_SECONDS, interval=0.1)
    watching = asyncio.create_task(guard.run())
    producer = await kafka.start_producer(bootstrap)
    ingest = Ingest(settings, Publisher(producer), Authenticator(settings, redis, pool), guard)
    app = http_app([Component("ingest", [router(ingest)])])
    headers = {"Content-Type": BATCH, "Authorization": "Bearer test-token"}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://t"
        ) as http:

            async def post(body: bytes) -> httpx.Response:
                return await http.post("/v1/events", content=body, headers=headers)

            assert (await post(orjson.dumps([event(tenant)]))).status_code == 202
            # the group does not consume: what was written grows older than the bound
            refused = await _until(lambda: post(orjson.dumps([event(tenant)])), 503)
            body = problem(refused, 503)
            assert body["type"].endswith("/overloaded") and body["lag_seconds"] >= BOUND_SECONDS
            assert 1 <= int(refused.headers["retry-after"]) <= 30
            # refused before the body is read: a malformed one is not even looked at
            assert (await post(b"{not json")).status_code == 503

            await commit_to_end(group)  # the aggregator caught up
            accepted = await _until(lambda: post(orjson.dumps([event(tenant)])), 202)
            assert accepted.json()["accepted"] == 1
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await producer.stop()


async def _until(attempt: Callable[[], Awaitable[httpx.Response]], status: int) -> httpx.Response:
    """Repeat ``attempt`` until it answers ``status`` (15 s at most)."""
    async with asyncio.timeout(15):
        while True:
            response = await attempt()
            if response.status_code == status:
                return response
            await asyncio.sleep(0.1)
