"""Spend alerts on the whole invoice to date: rated by billing when usage changes.

A spend rule without a meter fires when the period's invoice to date (the plan's fee
plus every priced meter's usage line, each rounded as the invoice rounds it) reaches an
amount.  The sum of several meters' tiered prices is no usage level of one meter, and
Redis Lua numbers are doubles, so the aggregator does not rate: its batch call marks a
customer with such rules whenever it changes a month total (``schemas.alerts.SPEND_FIELD``),
the aggregator hands the mark over to ``redis_keys.SPEND_DUE``, and ``SpendWatch`` pops
it at once and rates the live month counters with the invoicing code.

Once per customer, rule, threshold and period: the highest threshold at or below the
amount fires when it is above the highest one already fired this period
(``redis_keys.spend_fired``), through ``publish_once`` under an id derived from (customer,
rule, threshold, period start).  A crash between the publish and the marker repeats the
same id, which publishes nothing; a replayed batch changes no counter, so rating it
again finds nothing new.  The period is the quota month, as for every other alert: the
UTC calendar month, or the local one of a customer billed in a time zone, whose additive
meters the aggregator also counts by local month (``schemas.zones.quota_month``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.alerts import AlertKind
from schemas.catalog import ADDITIVE
from schemas.events import from_micros, utcnow
from schemas.notifications import Notification, NotificationType, moment
from schemas.plans import Plan
from schemas.windows import Window, bucket_id
from schemas.zones import quota_month
from services.billing.invoicing import compose
from services.billing.invoicing.periods import UTC_ZONE, Period
from services.billing.notification.alerts import rules
from services.billing.notification.alerts.compile import mark_due, plan_of
from services.billing.notification.alerts.rules import Rule
from services.billing.notification.alerts.spend import MAX_MICROS
from services.billing.rating import engine as rating
from services.common.logging import get_logger
from services.common.meter_cache import MeterCache
from services.common.notify import publish_once
from services.common.waits import Backoff, reraise_if_cancelling, surviving
from services.common.zone_book import ZoneOf, in_utc

log = get_logger("tally.billing.spend_alerts")

REMEMBER = timedelta(days=40)
"""How long ``publish_once`` remembers a fired id: longer than any month."""
FIRED_TTL = timedelta(days=62)
BATCH = 100  # customers popped from the due set at once
WAIT_SECONDS = 1.0  # how long one waiting pop polls before it returns empty-handed
POLL_SECONDS = 0.05  # how soon it looks again after finding none due
POLL_MOST_SECONDS = 0.4  # doubled while none is, up to this: a crossing waits at most this


def month_of(now: datetime, tz: ZoneInfo | None = None) -> Period:
    """The quota month ``now`` falls in for a customer billed in ``tz`` (None: UTC): the
    period live counters and alerts use."""
    month = quota_month(now, tz)
    return Period(month.start, month.end, tz or UTC_ZONE)


def invoice_to_date(plan: Plan, usage: Mapping[str, Decimal], period: Period) -> Decimal:
    """The period's invoice to date on ``plan``: the whole fee and one usage line per
    priced meter, built and rounded by the invoicing code itself."""
    lines = compose.lines(
        [compose.Span(plan.id, period.start, period.end)],
        [compose.Stretch(plan.id, period.start.date(), period.end.date())],
        {(0, meter): quantity for meter, quantity in usage.items()},
        {plan.id: plan},
        lambda _plan, _at: period,
    )
    return rating.total(lines)


def reachable(plan: Plan, amount: Decimal) -> bool:
    """Whether some usage brings the invoice to ``amount`` (the counters' largest total
    on every priced meter bounds what usage can add)."""
    most = from_micros(MAX_MICROS)
    ceiling = invoice_to_date(plan, dict.fromkeys(plan.prices, most), month_of(utcnow()))
    return ceiling >= amount


def highest_crossed(rule: Rule, amount: Decimal, fired: Decimal | None) -> Decimal | None:
    """The threshold to fire: the highest at or below ``amount``, if above ``fired``."""
    best = max((value for value in rule.thresholds if value <= amount), default=None)
    if best is None or (fired is not None and best <= fired):
        return None
    return best


class SpendWatch:
    """Evaluates the whole-invoice spend rules of customers marked due."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        redis: Redis,
        meters: MeterCache | None = None,
        zone_of: ZoneOf = in_utc,
    ) -> None:
        """``meters`` tells additive meters (counted by local month too) from the others;
        ``zone_of``: each customer's billing zone."""
        self._pool = pool
        self._redis = redis
        self._meter_cache = meters
        self._zone_of = zone_of
        self._idle = Backoff(POLL_SECONDS, POLL_MOST_SECONDS)

    async def run(self) -> None:
        """Pop due customers as soon as they are marked, for as long as billing serves.
        A customer whose evaluation fails is marked due again; a crash loses the popped
        marks until the alerts safety-net recompile marks every such customer due."""
        while True:
            reraise_if_cancelling()  # a step that ate a cancellation must not go on
            with surviving(log, "spend alerts failed; retrying") as attempt:
                await self.drain(block=True)
            if attempt.failed:
                await asyncio.sleep(WAIT_SECONDS)

    async def drain(self, block: bool = False) -> int:
        """Evaluate the customers due now (waiting up to a second for one when
        ``block``); how many alerts fired."""
        due = await self._pop(block)
        fired = 0
        for index, customer in enumerate(due):
            try:
                fired += await self.evaluate(customer)
            except BaseException:
                await mark_due(self._redis, due[index:])
                raise
        return fired

    async def evaluate(self, customer: str, now: datetime | None = None) -> int:
        """Rate the customer's invoice to date and fire what it newly crossed."""
        now = now or utcnow()
        async with self._pool.connection() as conn:
            plan = await plan_of(conn, customer)
            whole = [r for r in await rules.listed(conn, customer) if rules.whole_invoice(r)]
        if plan is None or not whole:
            return 0
        tz = self._zone_of(customer)
        period = month_of(now, tz)
        usage = await self._usage(customer, plan, now, tz)
        amount = invoice_to_date(plan, usage, period)
        key = redis_keys.spend_fired(customer)
        fields = [f"{rule.id}|{moment(period.start)}" for rule in whole]
        markers = await self._redis.hmget(key, fields)
        fired = 0
        for rule, field, marker in zip(whole, fields, markers, strict=True):
            best = highest_crossed(rule, amount, None if marker is None else Decimal(_text(marker)))
            if best is None:
                continue
            message = notification(customer, plan, rule.id, best, amount, usage, period, now)
            await publish_once(self._redis, message, REMEMBER)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, field, str(best))
                pipe.expire(key, FIRED_TTL)
                await pipe.execute()
            fired += 1
        return fired

    async def _usage(
        self, customer: str, plan: Plan, now: datetime, tz: ZoneInfo | None
    ) -> dict[str, Decimal]:
        """The month's live totals of the plan's priced meters (the aggregator's counters):
        an additive meter's local month for a customer billed in a zone; other meters
        (a distinct count has no local month counter) their UTC month's."""
        local, utc = quota_month(now, tz).bucket, bucket_id(Window.MONTH, now)
        additive = await self._additive()
        meters = sorted(plan.prices)
        async with self._redis.pipeline(transaction=False) as pipe:
            for meter in meters:
                bucket = local if additive is None or meter in additive else utc
                pipe.hget(redis_keys.counters(customer, meter, Window.MONTH, bucket), "*")
            totals = await pipe.execute()
        return {
            meter: from_micros(int(total))
            for meter, total in zip(meters, totals, strict=True)
            if total is not None
        }

    async def _additive(self) -> frozenset[str] | None:
        """The names of count and sum meters; None when every meter is taken as one."""
        if self._meter_cache is None:
            return None
        index = await self._meter_cache.meters()
        return frozenset(
            name for name, meter in index.by_name.items() if meter.aggregation in ADDITIVE
        )

    async def _pop(self, block: bool) -> list[str]:
        """The customers due now; with ``block``, polled for up to ``WAIT_SECONDS`` when
        none is: ``POLL_SECONDS`` after finding none, doubled while none is due up to
        ``POLL_MOST_SECONDS`` (20 looks a second here and in the notification intake cost an
        idle ``tally up`` 1-2 % of a core), and again at once after finding some.

        Never ``BZPOPMIN``: a task cancelled inside a blocking pop can leave redis-py's
        connection waiting, which hung a stopping billing process (as it did the
        notification intake, which polls for the same reason)."""
        waited = 0.0
        while True:
            reraise_if_cancelling()
            popped: list[Any] = await self._redis.zpopmin(redis_keys.SPEND_DUE, BATCH)
            if popped:
                self._idle.reset()
            if popped or not block or waited >= WAIT_SECONDS:
                return [_text(pair[0]) for pair in popped]
            waited += self._idle.seconds
            await self._idle.wait()


def notification(
    customer: str,
    plan: Plan,
    rule: str,
    value: Decimal,
    amount: Decimal,
    usage: Mapping[str, Decimal],
    period: Period,
    at: datetime,
) -> Notification:
    """The ``alert.triggered`` of a whole-invoice spend threshold; its id is (customer,
    rule, threshold, period start), so deciding it again is the same notification."""
    data: dict[str, object] = {
        "meter": None,
        "period": {"start": moment(period.start), "end": moment(period.end)},
        "threshold": {"kind": AlertKind.SPEND.value, "value": str(value), "quantity": None},
        "usage": None,
        "amount": str(amount),
        "meters": {meter: str(quantity) for meter, quantity in sorted(usage.items())},
        "limit": None,
        "rule": rule,
        "currency": plan.currency,
    }
    what = ("*", moment(period.start), rule, AlertKind.SPEND.value, value)
    return Notification.decided(NotificationType.ALERT_TRIGGERED, customer, what, at, data)


def _text(item: object) -> str:
    return item.decode() if isinstance(item, bytes) else str(item)
