"""Usage for Stripe, queued exactly once and sent at least once.

:func:`enqueue` runs after each rollup pass.  In one transaction it compares every
customer-meter-day of ``usage_daily`` with what was queued before, and queues the
difference as a new revision, with the identifier ``tally:{customer}:{meter}:{day}:{rev}``.
Running it twice queues nothing new, so it cannot double-count.

:class:`MeterPusher` sends what is queued.  The outbox row is marked sent only after
Stripe answered, so a crash in between sends the same identifier again, and Stripe
drops it as a duplicate; that answer counts as delivered.  429 and 5xx back off and
retry; other refusals mark the row failed with Stripe's message.

Stripe only takes meter events from the last 35 days, and never negative ones, but it
cancels an event by its identifier within 24 hours of taking it.  A day whose usage goes
down while every event sent for it is that recent gets one event of its whole new
quantity, sent once Stripe has cancelled the earlier ones (``cancels``; they become
``cancelled``).  A correction that is older, or a decrease past those 24 hours, becomes
an ``adjustment``: the billing run's invoice carries the right quantity, and once that
invoice is final, a correction of it reaches Stripe as money (``corrections``).
Only count and sum meters are pushed, in whole units (Stripe meters sum integers).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import ADDITIVE
from services.billing.stripe import client as stripe_client
from services.common import catalog
from services.common.logging import get_logger

log = get_logger("tally.stripe")
STRIPE_WINDOW = timedelta(days=35)
MARGIN = timedelta(hours=1)  # do not race the edge of Stripe's window
MAX_BACKOFF = timedelta(minutes=30)
CANCEL_WINDOW = timedelta(hours=24)  # Stripe cancels a meter event this long after taking it

_ENQUEUE = """
    WITH changed AS (
        SELECT u.customer, u.meter, u.day, floor(u.value) AS quantity,
               floor(u.value) - coalesce(q.quantity, 0) AS delta,
               coalesce(q.revision, 0) + 1 AS revision,
               least(u.day + interval '1 day' - interval '1 second', now()) AS event_at,
               coalesce(s.recent, false) AS recent, s.ids
        FROM usage_daily u
        LEFT JOIN stripe_usage_queued q
            ON q.customer_id = u.customer AND q.meter = u.meter AND q.day = u.day
        LEFT JOIN LATERAL (
            SELECT array_agg(o.identifier ORDER BY o.revision) AS ids,
                   bool_and(o.state = 'sent' AND o.sent_at > now() - %(cancel_window)s)
                       AS recent
            FROM stripe_outbox o
            WHERE o.customer_id = u.customer AND o.meter = u.meter AND o.day = u.day
              AND o.state IN ('sent', 'pending')
        ) s ON floor(u.value) < coalesce(q.quantity, 0)
        WHERE u.group_key = '*' AND u.meter = ANY(%(meters)s)
          AND floor(u.value) <> coalesce(q.quantity, 0)
    ), queued AS (
        INSERT INTO stripe_usage_queued (customer_id, meter, day, quantity, revision)
        SELECT customer, meter, day, quantity, revision FROM changed
        ON CONFLICT (customer_id, meter, day) DO UPDATE
            SET quantity = excluded.quantity, revision = excluded.revision
    )
    INSERT INTO stripe_outbox (identifier, customer_id, meter, day, revision, quantity,
                               event_at, state, cancels)
    SELECT 'tally:' || customer || ':' || meter || ':' || day || ':' || revision,
           customer, meter, day, revision,
           CASE WHEN delta < 0 AND recent THEN quantity ELSE delta END, event_at,
           CASE WHEN event_at < now() - %(window)s OR (delta < 0 AND NOT recent)
                THEN 'adjustment' ELSE 'pending' END,
           CASE WHEN delta < 0 AND recent THEN ids ELSE '{}' END
    FROM changed
"""


async def enqueue(pool: AsyncConnectionPool) -> int:
    """Queue every change of daily usage since the last call; returns the rows queued."""
    async with pool.connection() as conn:
        meters = [m.name for m in await catalog.meters(conn) if m.aggregation in ADDITIVE]
        cur = await conn.execute(
            _ENQUEUE,
            {
                "meters": meters,
                "window": STRIPE_WINDOW - MARGIN,
                "cancel_window": CANCEL_WINDOW - MARGIN,
            },
        )
        return cur.rowcount


@dataclass(frozen=True, slots=True)
class Queued:
    id: int
    identifier: str
    customer: str
    meter: str
    quantity: int
    event_at: datetime
    attempts: int
    cancels: tuple[str, ...] = ()  # identifiers Stripe must cancel before this is sent


@dataclass(slots=True)
class PushReport:
    sent: int = 0
    cancelled: int = 0
    retrying: int = 0
    adjustments: int = 0
    failed: int = 0


class MeterPusher:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        api: stripe.StripeClient,
        stream: bool = False,
        batch: int = 100,
    ) -> None:
        self._pool = pool
        self._api = api
        self._stream = stream
        self._batch = batch

    async def push(self, now: datetime | None = None) -> PushReport:
        """Send what is due, one batch at a time, until nothing is."""
        report = PushReport()
        while True:
            async with self._pool.connection() as conn, conn.transaction():
                due = await _due(conn, self._batch)
                if not due:
                    return report
                await self._send(conn, due, report, now or datetime.now(UTC))

    async def _send(
        self, conn: AsyncConnection, due: Sequence[Queued], report: PushReport, now: datetime
    ) -> None:
        ready: list[tuple[Queued, dict[str, Any]]] = []
        customers: dict[str, str] = {}
        for meter in {row.meter for row in due}:
            await stripe_client.ensure_meter(conn, self._api, meter)
        for row in due:
            if row.event_at < now - STRIPE_WINDOW + MARGIN:
                await _settle(conn, row, "adjustment", "older than Stripe's 35-day window")
                report.adjustments += 1
                continue
            try:
                if row.customer not in customers:
                    customers[row.customer] = await stripe_client.ensure_customer(
                        conn, self._api, row.customer
                    )
            except LookupError:
                await _settle(conn, row, "failed", "no Tally customer with this id")
                report.failed += 1
                continue
            if row.cancels and not await self._cancel(conn, row, report):
                continue
            ready.append((row, _event(row, customers[row.customer])))
        if self._stream:
            await self._send_stream(conn, ready, report)
        else:
            for row, event in ready:
                await self._send_one(conn, row, event, report)

    async def _cancel(self, conn: AsyncConnection, row: Queued, report: PushReport) -> bool:
        """Cancel the events ``row`` replaces; False when Stripe would not (the row is
        then settled or retried as a refusal of the event itself would be)."""
        name = stripe_client.event_name(row.meter)
        for identifier in row.cancels:
            params: Any = {
                "event_name": name,
                "type": "cancel",
                "cancel": {"identifier": identifier},
            }
            try:
                await asyncio.to_thread(self._api.v1.billing.meter_event_adjustments.create, params)
            except stripe.StripeError as exc:
                if "already" not in str(exc.user_message or exc):  # cancelled before a crash
                    await _failed(conn, row, exc, report)
                    return False
            await conn.execute(
                "UPDATE stripe_outbox SET state = 'cancelled' WHERE identifier = %s", (identifier,)
            )
            report.cancelled += 1
        return True

    async def _send_one(
        self, conn: AsyncConnection, row: Queued, event: dict[str, Any], report: PushReport
    ) -> None:
        try:
            await asyncio.to_thread(self._api.v1.billing.meter_events.create, event)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            await _failed(conn, row, exc, report)
            return
        await _settle(conn, row, "sent")
        report.sent += 1

    async def _send_stream(
        self,
        conn: AsyncConnection,
        ready: Sequence[tuple[Queued, dict[str, Any]]],
        report: PushReport,
    ) -> None:
        if not ready:
            return
        try:
            session = await asyncio.to_thread(self._api.v2.billing.meter_event_session.create)
            events: Any = [{**e, "timestamp": _rfc3339(e["timestamp"])} for _, e in ready]
            await asyncio.to_thread(
                self._api.v2.billing.meter_event_stream.create,
                {"events": events},
                {"api_key": session.authentication_token},
            )
        except stripe.StripeError as exc:
            for row, _ in ready:
                await _failed(conn, row, exc, report)
            return
        for row, _ in ready:
            await _settle(conn, row, "sent")
        report.sent += len(ready)


async def _due(conn: AsyncConnection, limit: int) -> list[Queued]:
    cur = await conn.execute(
        "SELECT id, identifier, customer_id, meter, quantity, event_at, attempts, cancels"
        " FROM stripe_outbox WHERE state = 'pending' AND next_attempt_at <= now()"
        " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
        (limit,),
    )
    return [
        Queued(r[0], r[1], r[2], r[3], int(r[4]), r[5], r[6], tuple(r[7]))
        for r in await cur.fetchall()
    ]


def _event(row: Queued, stripe_customer: str) -> dict[str, Any]:
    return {
        "event_name": stripe_client.event_name(row.meter),
        "identifier": row.identifier,
        "timestamp": int(row.event_at.timestamp()),
        "payload": {"stripe_customer_id": stripe_customer, "value": str(row.quantity)},
    }


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def _settle(conn: AsyncConnection, row: Queued, state: str, note: str | None = None) -> None:
    await conn.execute(
        "UPDATE stripe_outbox SET state = %s, sent_at = now(), last_error = %s,"
        " attempts = attempts + 1 WHERE id = %s",
        (state, note, row.id),
    )


async def _failed(
    conn: AsyncConnection, row: Queued, exc: stripe.StripeError, report: PushReport
) -> None:
    """Stripe said no: a duplicate identifier was delivered before; 429/5xx/network
    errors retry with backoff; anything else is a failure to look at."""
    message = str(exc.user_message or exc)
    if isinstance(exc, stripe.InvalidRequestError) and "already exists" in message:
        await _settle(conn, row, "sent", "delivered before (duplicate identifier)")
        report.sent += 1
    elif _retryable(exc):
        delay = min(timedelta(seconds=2**row.attempts), MAX_BACKOFF) * random.uniform(0.5, 1)
        await conn.execute(
            "UPDATE stripe_outbox SET attempts = attempts + 1, last_error = %s,"
            " next_attempt_at = now() + %s WHERE id = %s",
            (message, delay, row.id),
        )
        report.retrying += 1
    else:
        await _settle(conn, row, "failed", message)
        report.failed += 1
        log.error("meter event refused", identifier=row.identifier, error=message)


def _retryable(exc: stripe.StripeError) -> bool:
    status = exc.http_status or 0
    return isinstance(exc, stripe.APIConnectionError) or status == 429 or status >= 500
