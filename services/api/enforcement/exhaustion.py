"""``quota.exhausted``: told at the first refusal of a hard quota in a period.

Refusals are the hot path, so telling costs them nothing: a refusal already told by this
process (a small memo of (customer, meter, period)) is a set lookup; the first one
starts a background publish and returns.  ``publish_once`` makes the stream carry it
once across processes (a marker and the XADD in one Redis script).  If Redis cannot take
it the failure is logged, the memo forgets it, and the next refusal tries again; the
refusal itself is never delayed or failed.  A process that dies between the refusal and
the publish loses the telling until the customer is refused again.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal

from redis.asyncio import Redis

from schemas.notifications import Notification, NotificationType, moment
from schemas.zones import QuotaMonth, quota_month
from services.api.enforcement.limiter import Outcome
from services.common.logging import get_logger
from services.common.notify import publish_once
from services.common.zone_book import ZoneOf, in_utc

log = get_logger("tally.enforce")

KIND = NotificationType.QUOTA_EXHAUSTED
MEMO = 100_000
"""Refusals remembered per process before the memo starts afresh (then Redis dedupes)."""
REMEMBER = timedelta(days=40)
"""How long the marker outlives the refusal: beyond the month it is about."""
PREFIX = "quota:"


class Exhaustion:
    def __init__(self, redis: Redis, zone_of: ZoneOf = in_utc) -> None:
        """``zone_of``: each customer's billing zone, where its quota months start."""
        self._zone_of = zone_of
        self._redis = redis
        self._told: set[tuple[str, str, datetime]] = set()
        self._pending: set[asyncio.Task[None]] = set()

    def refused(self, customer: str, outcome: Outcome, now: datetime) -> None:
        """Note a refusal; tells when it is a hard quota's first in the period."""
        violated = outcome.violated
        if violated is None or violated.kind != "quota" or not violated.hard:
            return
        meter = violated.policy.removeprefix(PREFIX)
        month = quota_month(now, self._zone_of(customer))
        memo = (customer, meter, month.start)
        if memo in self._told:
            return
        if len(self._told) >= MEMO:
            self._told.clear()
        self._told.add(memo)
        note = notice(customer, meter, month, violated.limit, now)
        task = asyncio.create_task(self._tell(memo, note))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for the publishes under way (at shutdown)."""
        await asyncio.gather(*self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _tell(self, memo: tuple[str, str, datetime], note: Notification) -> None:
        try:
            await publish_once(self._redis, note, REMEMBER)
        except Exception as exc:  # never the refusal's problem; retried on the next one
            self._told.discard(memo)
            log.warning("quota.exhausted not published", id=note.id, error=repr(exc))


def notice(
    customer: str, meter: str, month: QuotaMonth, limit: Decimal, now: datetime
) -> Notification:
    start, end = month.start, month.end
    return Notification.decided(
        KIND,
        customer,
        (meter, moment(start)),
        now,
        {
            "meter": meter,
            "period": {"start": moment(start), "end": moment(end)},
            "limit": format(limit, "f"),
        },
    )
