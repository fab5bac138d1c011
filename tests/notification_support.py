"""What producers put on the notification stream, read back with XRANGE."""

from __future__ import annotations

from redis.asyncio import Redis

from schemas.notifications import STREAM, Notification, NotificationType


async def published(
    redis: Redis, prefix: str, kind: NotificationType | None = None
) -> list[Notification]:
    """The notifications on the stream for customers whose id starts with ``prefix``."""
    found = []
    for _, fields in await redis.xrange(STREAM) or []:
        assert fields is not None
        note = Notification.model_validate_json(fields[b"n"])
        if note.customer.startswith(prefix) and (kind is None or note.type is kind):
            found.append(note)
    return found
