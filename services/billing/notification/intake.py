"""The notification outbox's intake: the Redis stream into PostgreSQL, each id once.

Producers publish to ``schemas.notifications.STREAM``; this reads it in the consumer
group ``notifier`` and, per batch, in one transaction stores each notification once
(``ON CONFLICT (id) DO NOTHING``: a replayed, retried or duplicate publication of the same
decision is the same notification) and, for a new one, a delivery row per channel:
every enabled endpoint of the customer and every enabled seller endpoint whose event types
match, plus the customer's email when a mailer is configured.  Entries are acknowledged
only after the commit, so a crash in between re-reads them (and stores nothing twice).

At start it takes over what a crashed notifier left unacknowledged (``XAUTOCLAIM``) and
re-reads its own pending entries.  After a new notification is stored it wakes the
sender at once and calls the registered listeners (e.g. alerts recompiling thresholds
when a plan changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from schemas.notifications import STREAM, Notification, NotificationType, moment
from services.common.logging import get_logger
from services.common.metrics import NOTIFICATIONS
from services.common.waits import Backoff, reraise_if_cancelling, surviving

log = get_logger("tally.notifications")
GROUP = "notifier"
BATCH = 200
IDLE_SECONDS = 0.05  # the first wait after a read of an empty stream
IDLE_MOST_SECONDS = 0.4  # doubled while it stays empty, up to this: ~3 reads a second idle
STALE_MS = 60_000  # an entry another notifier has held this long without acking: it died

Listener = Callable[[Notification], Awaitable[None]]


def payload(notification: Notification) -> dict[str, Any]:
    """The webhook body: ``{type, timestamp, data}`` (Standard Webhooks' shape)."""
    return {
        "type": notification.type.value,
        "timestamp": moment(notification.occurred_at),
        "data": notification.data,
    }


_NOTIFICATIONS = """
    INSERT INTO notifications (id, type, customer_id, occurred_at, payload)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::jsonb[])
    ON CONFLICT (id) DO NOTHING
    RETURNING id
"""

_DELIVERIES = """
    INSERT INTO notification_deliveries (notification_id, channel, endpoint_id, recipient)
    SELECT n.id, d.channel, d.endpoint_id, d.recipient
    FROM unnest(%(ids)s::text[], %(customers)s::text[], %(types)s::text[], %(only)s::text[],
                %(mail)s::boolean[]) WITH ORDINALITY AS n(id, customer, type, only_id, mail, at)
    CROSS JOIN LATERAL (
        SELECT 'webhook' AS channel, e.id AS endpoint_id, e.id AS recipient
        FROM webhook_endpoints e
        WHERE (e.customer_id = n.customer OR e.customer_id IS NULL)
          AND e.deleted_at IS NULL AND e.disabled_at IS NULL
          AND (e.event_types IS NULL OR n.type = ANY(e.event_types))
          AND (n.only_id IS NULL OR e.id = n.only_id)
        UNION ALL
        SELECT 'email', NULL, c.email FROM customers c
        WHERE n.mail AND c.id = n.customer AND c.email IS NOT NULL AND c.email <> ''
    ) d
    ORDER BY n.at
    ON CONFLICT DO NOTHING
"""


async def store(
    conn: AsyncConnection, notifications: Sequence[Notification], mail: bool
) -> list[Notification]:
    """Store each notification once with its delivery rows; returns those that are new.
    A ``webhook.test`` goes only to the endpoint it names, and never by email.

    Two statements however many notifications (a batch of the stream is up to 200):
    per notification, they were most of the intake's time at a thousand a second."""
    once: dict[str, Notification] = {}
    for n in notifications:  # the same id twice in a batch: the first one stands
        once.setdefault(n.id, n)
    first = list(once.values())
    cur = await conn.execute(
        _NOTIFICATIONS,
        (
            [n.id for n in first],
            [n.type.value for n in first],
            [n.customer for n in first],
            [n.occurred_at for n in first],
            [orjson.dumps(payload(n)).decode() for n in first],
        ),
    )
    created = {row[0] for row in await cur.fetchall()}
    new = [n for n in first if n.id in created]
    if new:
        tests = [n.type is NotificationType.WEBHOOK_TEST for n in new]
        await conn.execute(
            _DELIVERIES,
            {
                "ids": [n.id for n in new],
                "customers": [n.customer for n in new],
                "types": [n.type.value for n in new],
                "only": [
                    str(n.data.get("endpoint_id", "")) if test else None
                    for n, test in zip(new, tests, strict=True)
                ],
                "mail": [mail and not test for test in tests],
            },
        )
    return new


class Intake:
    """Reads the stream, stores, acknowledges; ``accept`` stores directly (the test
    webhook route)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        redis: Redis,
        wake: asyncio.Event,
        mail: bool,
        consumer: str = "",
        stale_ms: int = STALE_MS,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._wake = wake
        self._mail = mail
        self._consumer = consumer or socket.gethostname()
        self._stale_ms = stale_ms
        self._idle = Backoff(IDLE_SECONDS, IDLE_MOST_SECONDS)
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` after each NEW notification is stored (never for a repeat)."""
        self._listeners.append(listener)

    async def accept(self, notifications: Sequence[Notification]) -> list[Notification]:
        """Store, then wake the sender and tell the listeners; returns the new ones."""
        async with self._pool.connection() as conn, conn.transaction():
            new = await store(conn, notifications, self._mail)
        await self._stored(new)
        return new

    async def _stored(self, new: Sequence[Notification]) -> None:
        if not new:
            return
        self._wake.set()
        for n in new:
            NOTIFICATIONS.labels(n.type.value).inc()
            for listener in self._listeners:
                try:
                    await listener(n)
                except Exception as exc:  # one listener's failure is not the intake's
                    log.error("notification listener failed", id=n.id, error=repr(exc))

    async def run(self) -> None:
        """Consume for as long as the process serves; a failed batch is read again."""
        backlog = True
        while True:
            reraise_if_cancelling()
            with surviving(log, "notification intake failed") as attempt:
                if backlog:
                    await self._ensure_group()
                    await self._claim_stale()
                    while await self._read("0"):
                        pass
                    backlog = False
                if await self._read(">"):
                    self._idle.reset()
                else:
                    await self._idle.wait()
            if attempt.failed:
                backlog = True
                await asyncio.sleep(1.0)

    async def _ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)

    async def _claim_stale(self) -> None:
        """Take over entries a dead notifier read and never acknowledged."""
        start: Any = "0-0"
        while True:
            reply = await self._redis.xautoclaim(
                STREAM, GROUP, self._consumer, self._stale_ms, start_id=start, count=BATCH
            )
            start, entries = reply[0], reply[1]
            if entries:
                await self._handle(entries)
            if start in (b"0-0", "0-0"):
                return

    async def _read(self, position: str) -> int:
        """One batch from ``position`` (``0``: this consumer's pending, ``>``: new).

        Never ``BLOCK``: a task cancelled inside a blocking read can leave redis-py's
        connection waiting (seen here on shutdown), so an empty stream is polled instead:
        50 ms after it was found empty, doubled while it stays so up to 0.4 s (20 reads a
        second here and in the spend watch cost an idle ``tally up`` 1-2 % of a core)."""
        reply: Any = await self._redis.xreadgroup(
            GROUP,
            self._consumer,
            {STREAM: position},
            count=BATCH,
        )
        entries = reply[0][1] if reply else []
        if entries:
            await self._handle(entries)
        return len(entries)

    async def _handle(self, entries: Sequence[tuple[Any, Any]]) -> None:
        notifications = []
        for entry_id, fields in entries:
            found = _parse(entry_id, fields)
            if found is not None:
                notifications.append(found)
        new = []
        if notifications:
            async with self._pool.connection() as conn, conn.transaction():
                new = await store(conn, notifications, self._mail)
        await self._redis.xack(STREAM, GROUP, *[entry_id for entry_id, _ in entries])
        await self._stored(new)


def _parse(entry_id: Any, fields: Any) -> Notification | None:
    """A stream entry's notification; a malformed one is logged and dropped (it can
    never become valid, and must not block the ones behind it)."""
    raw = (fields or {}).get(b"n", (fields or {}).get("n"))
    if raw is None:
        log.error("notification entry without 'n'", entry=str(entry_id))
        return None
    try:
        return Notification.model_validate_json(raw)
    except ValidationError as exc:
        log.error("malformed notification", entry=str(entry_id), error=str(exc))
        return None
