"""Publish a notification: one XADD to the stream billing's notifier reads."""

from __future__ import annotations

from datetime import timedelta

from redis.asyncio import Redis

from schemas import lua
from schemas.notifications import STREAM, STREAM_MAXLEN, Notification

SENT = "{" + STREAM + "}:sent:"
"""Prefix of the markers ``publish_once`` leaves, hash-tagged into the stream's slot so
the marker and the XADD are one atomic script on Redis Cluster too."""

_ONCE = lua.source("publish_once")


async def publish(redis: Redis, notification: Notification) -> None:
    """Hand a notification over; publishing the same id again is harmless (the notifier
    stores each id once)."""
    await redis.xadd(
        STREAM,
        {"n": notification.model_dump_json()},
        maxlen=STREAM_MAXLEN,
        approximate=True,
    )


async def publish_once(redis: Redis, notification: Notification, remember: timedelta) -> bool:
    """Publish unless this id was published (by this function) within ``remember``;
    True when it was published now.

    For producers that re-decide the same thing on every pass (scan jobs, the first
    refusal of a quota in several processes): the marker and the XADD are one script,
    so a crash never leaves one without the other, and the stream carries the id once."""
    published = await redis.eval(
        _ONCE,
        2,
        SENT + notification.id,
        STREAM,
        int(remember.total_seconds() * 1000),
        STREAM_MAXLEN,
        notification.model_dump_json(),
    )
    return bool(published)
