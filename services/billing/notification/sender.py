"""The delivery worker: sends what the outbox holds, retries on the schedule, logs every try.

Due rows are claimed in one statement (``state = 'sending'`` under a lease) and sent
outside any transaction; each result is recorded with its ``Attempt`` in one short
transaction, shared with the results that finished meanwhile (``results``).  Isolation:
at most ``per_endpoint`` deliveries are in flight to one endpoint (or email address) and
``concurrency`` in all, and each attempt is bounded by the timeout, so a slow or dead
endpoint holds a few slots and never delays anyone else's deliveries, nor the intake.

A row left ``sending`` by a crash between send and commit is claimed again once its lease
has run out and sent again under the same ``webhook-id`` (the notification id): the
receiver de-duplicates, and never sees two ids for one notification.

The sender wakes at once when the intake stores something, or a slot frees; otherwise
it looks for due retries every ``poll`` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from schemas.notifications import Notification
from services.billing.notification import urls, webhook
from services.billing.notification.channel import Attempt, Mailer
from services.billing.notification.results import Recorder, Result
from services.common.logging import get_logger
from services.common.metrics import DELIVERIES, DELIVERY_LATENCY, DELIVERY_QUEUE
from services.common.problems import Problem
from services.common.settings import Settings
from services.common.waits import reraise_if_cancelling, surviving, wait_set

log = get_logger("tally.notifications")
JITTER = 0.2  # each retry delay is stretched or shrunk by up to a fifth
GAUGE_SECONDS = 5.0
MAX_RETRY_AFTER = 3600.0  # a receiver's Retry-After is honoured up to an hour


@dataclass(frozen=True, slots=True)
class Policy:
    schedule: tuple[float, ...]  # seconds before attempt 1, 2, ...; its length = attempts
    timeout: float
    lease: float
    concurrency: int
    per_endpoint: int
    poll: float
    development: bool = False  # production: every attempt re-checks the URL's addresses

    def retry_in(self, attempts: int) -> timedelta | None:
        """After ``attempts`` failed attempts: how long until the next, or ``None``."""
        if attempts >= len(self.schedule):
            return None
        delay = self.schedule[attempts] * random.uniform(1 - JITTER, 1 + JITTER)
        return timedelta(seconds=delay)


@dataclass(frozen=True, slots=True)
class Due:
    id: int
    notification_id: str
    type: str
    customer_id: str
    occurred_at: datetime
    payload: dict[str, Any]
    channel: str
    recipient: str
    endpoint_id: str | None
    attempts: int
    url: str | None
    secret: str | None
    previous_secret: str | None
    previous_secret_until: datetime | None
    endpoint_off: str | None  # why the endpoint takes nothing now (deleted, disabled)
    company: str | None  # the customer's company, to greet an email's reader by name

    @property
    def target(self) -> str:
        return self.endpoint_id or self.recipient

    def secrets(self, now: datetime) -> list[str]:
        """The current secret, and the rotated-out one while its overlap lasts."""
        found = [self.secret] if self.secret else []
        if self.previous_secret and self.previous_secret_until and self.previous_secret_until > now:
            found.append(self.previous_secret)
        return found

    def notification(self) -> Notification:
        return Notification.model_validate(
            {
                "id": self.notification_id,
                "type": self.type,
                "customer": self.customer_id,
                "occurred_at": self.occurred_at,
                "data": self.payload["data"],
            }
        )


_DUE = """((d.state = 'pending' AND d.next_attempt_at <= now())
          OR (d.state = 'sending' AND d.leased_until < now()))"""

_CLAIM = f"""
    WITH ranked AS (
        SELECT d.id, d.next_attempt_at,
               coalesce(d.endpoint_id, d.recipient) AS target,
               row_number() OVER (PARTITION BY coalesce(d.endpoint_id, d.recipient)
                                  ORDER BY d.next_attempt_at, d.id) AS n
        FROM notification_deliveries d
        WHERE {_DUE} AND (%(mail)s OR d.channel <> 'email')
    ), picked AS (
        SELECT d.id FROM notification_deliveries d
        WHERE d.id IN (
            SELECT id FROM ranked
            WHERE n <= %(cap)s - coalesce((%(inflight)s::jsonb ->> target)::int, 0)
            ORDER BY next_attempt_at, id LIMIT %(limit)s
        ) AND {_DUE}
        FOR UPDATE SKIP LOCKED
    )
    UPDATE notification_deliveries d
    SET state = 'sending', leased_until = now() + %(lease)s
    FROM picked WHERE d.id = picked.id
    RETURNING d.id
"""
"""Due rows, at most ``cap`` per endpoint (less what is in flight to it here), locked
with ``SKIP LOCKED`` so that several senders never take the same row, marked ``sending``
under a lease.  ``_DUE`` is checked again on the locked row version."""

_DETAILS = """
    SELECT d.id, n.id AS notification_id, n.type, n.customer_id, n.occurred_at, n.payload,
           d.channel, d.recipient, d.endpoint_id, d.attempts, e.url, e.secret,
           e.previous_secret, e.previous_secret_until,
           CASE WHEN e.deleted_at IS NOT NULL THEN 'the endpoint was deleted'
                WHEN e.disabled_at IS NOT NULL THEN 'endpoint disabled: ' || e.disabled_reason
           END AS endpoint_off,
           nullif(c.company, '') AS company
    FROM notification_deliveries d
    JOIN notifications n ON n.id = d.notification_id
    LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
    LEFT JOIN customers c ON c.id = n.customer_id
    WHERE d.id = ANY(%s)
    ORDER BY d.next_attempt_at, d.id
"""


class Sender:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        policy: Policy,
        wake: asyncio.Event,
        mailer: Mailer | None = None,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._wake = wake
        self._mailer = mailer
        self._client: aiohttp.ClientSession | None = None  # opened by ``run``, in its loop
        self._results = Recorder(pool)
        self._inflight: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._gauge_at = 0.0

    async def run(self) -> None:
        """Send for as long as the process serves; cancelled, it abandons what is in
        flight (those rows are sent again after their lease)."""
        self._client = webhook.session(self._policy.concurrency)
        try:
            while True:
                reraise_if_cancelling()
                self._wake.clear()
                full = False
                with surviving(log, "notification sender failed"):
                    full = await self.pass_once()
                if not full:
                    await wait_set(self._wake, self._policy.poll)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._results.close()
            await self._client.close()

    async def pass_once(self) -> bool:
        """Claim what is due into the free slots and start sending it; ``True`` when
        every free slot was filled (there may be more to claim)."""
        await self._measure_queue()
        free = self._policy.concurrency - len(self._tasks)
        if free <= 0:
            return False
        due = await self._claim(free)
        for row in due:
            self._inflight[row.target] += 1
            task = asyncio.create_task(self._deliver(row), name=f"deliver {row.id}")
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, target=row.target))
        return len(due) == free

    def _done(self, task: asyncio.Task[None], *, target: str) -> None:
        self._tasks.discard(task)
        self._inflight[target] -= 1
        if self._inflight[target] <= 0:
            del self._inflight[target]
        self._wake.set()  # a slot is free, maybe for an endpoint that was at its cap

    async def _claim(self, limit: int) -> list[Due]:
        policy = self._policy
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                _CLAIM,
                {
                    "mail": self._mailer is not None,
                    "cap": policy.per_endpoint,
                    "inflight": Jsonb(dict(self._inflight)),
                    "limit": limit,
                    "lease": timedelta(seconds=policy.lease),
                },
            )
            ids = [row[0] for row in await cur.fetchall()]
            if not ids:
                return []
            found = await conn.cursor(row_factory=class_row(Due)).execute(_DETAILS, (ids,))
            return await found.fetchall()

    async def _deliver(self, row: Due) -> None:
        try:
            if row.channel == "webhook" and (row.endpoint_off or row.url is None):
                await self._settle_off(row)
                return
            attempt = await self._attempt(row)
            await self._record(row, attempt)
        except Exception as exc:  # the lease runs out and the row is sent again
            log.error("delivery failed", delivery=row.id, error=repr(exc))

    async def _attempt(self, row: Due) -> Attempt:
        if row.channel == "email":
            assert self._mailer is not None
            started = time.monotonic()
            try:
                # Waiting for one of the mailer's connections counts too: an attempt that
                # outlived the lease would be claimed and mailed again meanwhile.
                async with asyncio.timeout(self._policy.lease / 2):
                    return await self._mailer.send(
                        row.notification(), row.recipient, company=row.company
                    )
            except Exception as exc:  # a mailer that raises is a failed attempt, retried
                took = round((time.monotonic() - started) * 1000)
                return Attempt(False, None, "", repr(exc)[:1024], took)
        assert row.url is not None and self._client is not None
        refused = await self._unsafe(row.url)
        if refused is not None:
            return Attempt(ok=False, status=None, response="", error=refused, duration_ms=0)
        body = orjson.dumps(row.payload)
        secrets_now = row.secrets(datetime.now(UTC))
        return await webhook.post(
            self._client, row.url, secrets_now, row.notification_id, body, self._policy.timeout
        )

    async def _unsafe(self, url: str) -> str | None:
        """Why ``url`` may not be called now: its host may have been re-pointed at an
        internal address since the endpoint was created (DNS rebinding)."""
        if self._policy.development:
            return None
        try:
            await urls.check(url, development=False)
        except Problem as refused:
            return f"refused: {refused.detail}"
        return None

    async def _record(self, row: Due, attempt: Attempt) -> None:
        """The attempt logged, and what it means for the delivery, committed (with the
        other attempts that finished meanwhile: ``results``)."""
        final = attempt.ok or attempt.gone or attempt.permanent  # nothing to retry
        retry = None if final else self._policy.retry_in(row.attempts + 1)
        if retry is not None and attempt.retry_after:
            retry = max(retry, timedelta(seconds=min(attempt.retry_after, MAX_RETRY_AFTER)))
        state = "succeeded" if attempt.ok else ("pending" if retry is not None else "failed")
        await self._results.record(Result(row.id, attempt, state, retry, row.endpoint_id))
        outcome = "succeeded" if attempt.ok else ("retrying" if retry is not None else "failed")
        DELIVERIES.labels(row.channel, outcome).inc()
        if attempt.ok:
            latency = (datetime.now(UTC) - row.occurred_at).total_seconds()
            DELIVERY_LATENCY.labels(row.channel).observe(max(latency, 0.0))

    async def _settle_off(self, row: Due) -> None:
        """An endpoint deleted or disabled since the row was queued: nothing is sent."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE notification_deliveries SET state = 'failed', last_error = %s,"
                " leased_until = NULL WHERE id = %s",
                (row.endpoint_off or "the endpoint is gone", row.id),
            )
        DELIVERIES.labels(row.channel, "failed").inc()

    async def _measure_queue(self) -> None:
        if time.monotonic() - self._gauge_at < GAUGE_SECONDS:
            return
        self._gauge_at = time.monotonic()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM notification_deliveries WHERE state IN ('pending', 'sending')"
            )
            row = await cur.fetchone()
        DELIVERY_QUEUE.set(row[0] if row else 0)


def policy(settings: Settings) -> Policy:
    """The delivery policy from settings; the lease always outlasts two timeouts of the
    slower channel (a webhook's or an email's), so a live worker's attempt is never taken
    for a crashed one and sent twice."""
    timeout = settings.webhook_timeout_seconds
    slowest = max(timeout, settings.smtp_timeout)
    return Policy(
        schedule=tuple(settings.webhook_retry_schedule),
        timeout=timeout,
        lease=max(settings.webhook_lease_seconds, 2 * slowest + 5),
        concurrency=settings.webhook_concurrency,
        per_endpoint=settings.webhook_per_endpoint,
        poll=settings.notification_poll_seconds,
        development=settings.env == "development",
    )
