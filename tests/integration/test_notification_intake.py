"""The intake: what a crashed notifier left unacknowledged is taken over, malformed
entries do not block the stream, listeners hear of new notifications only, and an idle
intake looks at the stream less often without missing what comes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.notifications import STREAM, Notification
from services.billing.notification.intake import GROUP, IDLE_MOST_SECONDS, Intake
from services.common.notify import publish
from services.common.settings import Settings
from tests.webhook_support import alert, eventually, new_customer, quick, running_notifier


async def _stored(pool: AsyncConnectionPool, notification_id: str) -> bool:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT 1 FROM notifications WHERE id = %s", (notification_id,))
        return await cur.fetchone() is not None


async def _pending(redis: Redis) -> Any:
    return (await redis.xpending(STREAM, GROUP))["pending"]


async def test_entries_a_dead_notifier_held_are_taken_over(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, tenant: str
) -> None:
    customer = await new_customer(pool, tenant)
    await redis.delete(STREAM)
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    n = alert(customer)
    await publish(redis, n)
    # a notifier that read the entry and died before storing and acknowledging it
    read: Any = await redis.xreadgroup(GROUP, "dead-notifier", {STREAM: ">"}, count=10)
    assert len(read[0][1]) == 1 and await _pending(redis) == 1

    intake = Intake(pool, redis, asyncio.Event(), mail=False, consumer="alive", stale_ms=0)
    task = asyncio.create_task(intake.run())
    try:
        await eventually(lambda: _stored(pool, n.id))
        await eventually(lambda: _acked(redis))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _acked(redis: Redis) -> bool:
    return bool(await _pending(redis) == 0)


async def test_malformed_entries_are_dropped_not_blocking(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, tenant: str
) -> None:
    customer = await new_customer(pool, tenant)
    heard: list[Notification] = []

    async def listener(n: Notification) -> None:
        heard.append(n)

    async with running_notifier(quick(settings), pool, redis, send=False) as run:
        run.notifier.intake.listen(listener)
        malformed = [
            await redis.xadd(STREAM, {"n": b'{"id": "msg_x", "type": "no.such.type"}'}),
            await redis.xadd(STREAM, {"other": b"field"}),
        ]
        try:
            n = alert(customer)
            await publish(redis, n)
            await eventually(lambda: _stored(pool, n.id))
            await eventually(lambda: _acked(redis))
            assert not await _stored(pool, "msg_x")
            assert [h.id for h in heard] == [n.id]
        finally:  # other tests read the stream back as notifications
            await redis.xdel(STREAM, *malformed)


async def test_an_idle_intake_looks_less_often_and_still_takes_what_comes(
    settings: Settings,
    pool: AsyncConnectionPool,
    redis: Redis,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    customer = await new_customer(pool, tenant)
    reads = 0
    read = redis.xreadgroup

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read(*args, **kwargs)

    monkeypatch.setattr(redis, "xreadgroup", counted)
    intake = Intake(pool, redis, asyncio.Event(), mail=False, consumer="idle")
    task = asyncio.create_task(intake.run())
    try:
        await asyncio.sleep(1.0)  # the backlog read, then the waits grow to their most
        before = reads
        await asyncio.sleep(2.0)
        # every 50 ms this would be ~40 reads; backing off to IDLE_MOST_SECONDS, ~5
        assert reads - before <= 2.0 / IDLE_MOST_SECONDS + 3, reads - before
        n = alert(customer)
        await publish(redis, n)
        await eventually(lambda: _stored(pool, n.id))
        await eventually(lambda: _acked(redis))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
