"""The period-end warning: told a day before a period ends when it will cost overage.

Every ``TALLY_LIFECYCLE_INTERVAL_SECONDS`` the billing service walks the customers; for
each whose current period ends within ``TALLY_PERIOD_END_WARNING_HOURS`` (24) it
forecasts the period (the upcoming invoice's forecast, ``invoicing.pace``: usage so far
plus the recent pace times the time left) and, when the forecast of any meter exceeds the
plan's included units or its quota, publishes one ``usage.forecast_overage`` with each
meter's usage, forecast, included units and quota, the forecast overage amount (what
the units beyond the included ones will cost, rated by the rating engine) and the
forecast invoice total.

Once per customer and period: the id is (customer, period start) and ``publish_once``
leaves a marker with the XADD in one Redis script, so repeated passes, several billing
processes and a crash mid-pass still put it on the stream once.  A customer already
warned costs one EXISTS per pass, not a forecast.  A customer below its included units
is forecast again every pass of the last day (its usage may still rise).

Pay-as-you-go prices include no units: any forecast usage exceeds them, so such a
customer is told what its usage will cost.  Quotas are compared with the period's total
over every plan it had; included units with the usage on the current plan (each stretch
on a plan is rated with that plan's own included units).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.events import utcnow
from schemas.invoices import LineKind
from schemas.notifications import Notification, NotificationType, moment, notification_id
from schemas.plans import Plan
from services.billing.invoicing import pace, subscriptions
from services.billing.invoicing.drafts import Draft, Drafter
from services.billing.invoicing.periods import Period, period_containing
from services.billing.invoicing.reader import Outlook, outlooks
from services.billing.notification.amounts import money, period, units
from services.billing.rating import engine as rating
from services.common import catalog
from services.common.clickhouse import ClickHouse
from services.common.notify import SENT, publish_once

KIND = NotificationType.USAGE_FORECAST_OVERAGE

REMEMBER = timedelta(days=7)
"""How long a warning's marker outlives its period."""
QUIET = frozenset({"cancelled", "suspended"})


class PeriodEndWarning:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        redis: Redis,
        clickhouse: Callable[[], ClickHouse],
        ahead: timedelta,
        clock: Callable[[], datetime] = utcnow,
        batch: int = 1000,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._clickhouse = clickhouse
        self._ahead = ahead
        self._clock = clock
        self._batch = batch

    async def run(self) -> int:
        """One pass over every customer; the number of warnings published."""
        now = self._clock()
        published = 0
        async with self._pool.connection() as conn:
            meters = {m.name: m for m in await catalog.meters(conn)}
            drafter = Drafter(await subscriptions.plan_book(conn), meters, self._clickhouse)
            cursor = ""
            while batch := await subscriptions.page(conn, cursor, self._batch):
                cursor = batch[-1].customer
                due = await self._unwarned(
                    [(s, span) for s in batch if (span := self._ending(drafter, s, now))]
                )
                for look in await outlooks(conn, drafter, meters, due, now):
                    note = warning(look)
                    if note is not None:
                        remember = look.period.end - now + REMEMBER
                        published += await publish_once(self._redis, note, remember)
        return published

    def _ending(
        self, drafter: Drafter, subscription: subscriptions.Subscription, now: datetime
    ) -> Period | None:
        """The subscription's current period if it ends within the warning's horizon."""
        if subscription.state_at(now).status in QUIET:
            return None
        plan = drafter.plan_at(subscription, now)
        span = period_containing(
            now, subscription.anchor, plan.cycle, plan.interval, subscription.tz
        )
        return span if span.end - now <= self._ahead else None

    async def _unwarned(
        self, due: list[tuple[subscriptions.Subscription, Period]]
    ) -> list[subscriptions.Subscription]:
        """Those not yet warned for the period: one pipelined EXISTS each."""
        if not due:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for subscription, span in due:
                pipe.exists(SENT + _id(subscription.customer, span))
            seen = await pipe.execute()
        return [s for (s, _), known in zip(due, seen, strict=True) if not known]


def warning(look: Outlook) -> Notification | None:
    """The warning this forecast calls for, or None when no meter's forecast exceeds its
    included units or its quota."""
    plan = look.plan
    rows, exceeded = [], False
    for meter in sorted({*plan.prices, *plan.quotas}):
        so_far, forecast = _total(look.so_far, meter), _total(look.whole, meter)
        current = _current(look.whole, meter)
        price, quota = plan.prices.get(meter), plan.quotas.get(meter)
        included = price.included if price is not None else None
        over_included = isinstance(included, Decimal) and current > included
        exceeded |= over_included or (quota is not None and forecast > quota.limit)
        rows.append(
            {
                "meter": meter,
                "usage": units(so_far),
                "forecast": units(forecast),
                "included": None if included is None else str(included),
                "quota": None if quota is None else units(quota.limit),
            }
        )
    if not exceeded:
        return None
    lines = look.whole.lines()
    customer = look.so_far.ask.subscription.customer
    data = {
        "plan": plan.id,
        "period": period(look.period),
        "meters": rows,
        "forecast_overage_amount": money(overage(look.whole)),
        "forecast_total": money(rating.total(lines)),
        "currency": plan.currency,
        "method": pace.METHOD,
    }
    what = (moment(look.period.start),)
    return Notification.decided(KIND, customer, what, look.as_of, data)


def overage(whole: Draft) -> Decimal:
    """What the forecast units beyond the included ones cost: each usage line less the
    same line at its included units (its minimum), both rated by the rating engine."""
    total = Decimal(0)
    for line in whole.lines():
        if line.kind is not LineKind.USAGE or line.meter is None or not line.billable:
            continue
        plan: Plan = whole.plans[line.plan]
        within = line.quantity - line.billable
        base = rating.usage_line(plan, line.meter, within, line.start, line.end)
        total += line.amount - base.amount
    return total


def _id(customer: str, span: Period) -> str:
    return notification_id(KIND, customer, moment(span.start))


def _total(draft: Draft, meter: str) -> Decimal:
    return sum((q for (_, m), q in draft.usage.items() if m == meter), Decimal(0))


def _current(draft: Draft, meter: str) -> Decimal:
    """The meter's usage on the current (last) stretch: what its included units cover."""
    last = len(draft.stretches) - 1
    return draft.usage.get((last, meter), Decimal(0))
