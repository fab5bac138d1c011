"""Publish a notification: one XADD to the stream billing's notifier reads."""

from __future__ import annotations

from redis.asyncio import Redis

from schemas.notifications import STREAM, STREAM_MAXLEN, Notification


async def publish(redis: Redis, notification: Notification) -> None:
    """Hand a notification over; publishing the same id again is harmless (the notifier
    stores each id once)."""
    await redis.xadd(
        STREAM,
        {"n": notification.model_dump_json()},
        maxlen=STREAM_MAXLEN,
        approximate=True,
    )
