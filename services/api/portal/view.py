"""Everything one customer's dashboard shows, gathered from the read models the JSON
APIs answer from (design rule 10: pages read what the APIs read).

- quotas and rate limits: ``LimitsReader``, as ``GET /v1/customers/{c}/limits``;
- 30 days of daily usage and the top groups this period: ``UsageReader`` and
  ``ranking``, as ``GET /v1/customers/{c}/usage``;
- the invoice to date, its forecast, recent invoices, alerts and webhook endpoints:
  billing's JSON API (``billing_reads``);
- included allowances: the plan's included units against the invoice to date's usage.

A grant limited to some meters sees only those meters' quotas, allowances, charts,
rankings, invoice lines and alerts; totals of money and the rate limits (which count
calls, not a meter) are the customer's whatever the meters.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.requests import Request

from schemas.alert_rules import AlertRule
from schemas.catalog import Aggregation, Meter
from schemas.events import utcnow
from schemas.invoices import Invoice, LineKind, UpcomingInvoice
from schemas.plans import Plan
from schemas.webhook_endpoints import EndpointOut
from schemas.windows import Window, bucket_start
from services.api.enforcement.status import LimitsReader, LimitsStatus
from services.api.portal import figures
from services.api.portal.billing_reads import BillingReads, BillingView
from services.api.portal.tokens import Grant
from services.api.usage import ranking
from services.api.usage.reader import UsageReader
from services.common import catalog
from services.common.meter_cache import MeterCache
from services.common.settings import Settings
from services.common.zone_book import ZoneOf, in_utc

DAYS = 30
TOP = 5


@dataclass(frozen=True, slots=True)
class Bar:
    """A quota, or a priced meter's included units, and how much of it is used."""

    meter: str
    name: str  # the quota's policy, or "included"
    used: Decimal
    limit: Decimal
    remaining: Decimal
    resets_at: datetime
    unit: str
    hard: bool | None = None  # quotas: refused beyond the limit

    @property
    def share(self) -> Decimal:
        return figures.percent(self.used, self.limit)


@dataclass(frozen=True, slots=True)
class Rate:
    policy: str
    limit: Decimal
    window_seconds: int
    remaining: Decimal
    endpoint: str | None
    algorithm: str | None


@dataclass(frozen=True, slots=True)
class Series:
    """One meter's daily usage, oldest day first."""

    meter: str
    unit: str
    days: list[tuple[datetime, Decimal]]


@dataclass(frozen=True, slots=True)
class Ranking:
    meter: str
    dimensions: tuple[str, ...]
    rows: list[tuple[dict[str, str], Decimal]]


@dataclass(frozen=True, slots=True)
class MeterMoney:
    """A meter's invoice to date and forecast to the period's end."""

    meter: str
    quantity: Decimal
    amount: Decimal
    forecast_quantity: Decimal
    forecast_billable: Decimal  # beyond the included units
    forecast_amount: Decimal


@dataclass(frozen=True, slots=True)
class Money:
    currency: str
    period_start: datetime
    period_end: datetime
    to_date: Decimal
    forecast: Decimal
    overage: Decimal  # the forecast's usage charges: what usage adds to the fees
    method: str
    meters: list[MeterMoney]


@dataclass(frozen=True, slots=True)
class Dashboard:
    customer: str
    plan: str
    status: str
    as_of: datetime
    bars: list[Bar]
    rates: list[Rate]
    series: list[Series]
    rankings: list[Ranking]
    since: datetime  # the first day of the series
    period_start: datetime  # of the rankings: the quota month
    money: Money | None  # None: billing unreadable
    invoices: list[Invoice] | None
    alerts: list[AlertRule] | None
    endpoints: list[EndpointOut] | None
    allowances_known: bool  # False: included units unknown (billing unreadable)


class DashboardView:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: AsyncConnectionPool,
        meters: MeterCache,
        zone_of: ZoneOf = in_utc,
    ) -> None:
        self._pool = pool
        self._meters = meters
        self._limits = LimitsReader(settings, redis, pool, zone_of)
        self._usage = UsageReader(redis, pool)
        self._billing = BillingReads(settings)

    async def gather(self, request: Request, grant: Grant) -> Dashboard:
        """The customer's dashboard now; an unknown customer raises 404 (``LimitsReader``)."""
        customer, now = grant.customer, utcnow()
        billed = asyncio.create_task(self._billing.read(request, customer))
        try:
            status = await self._limits.read(customer, now)
            async with self._pool.connection() as conn:
                plan = await catalog.read_plan(conn, status.plan)
            index = (await self._meters.meters()).by_name
            shown = [index[m] for m in _plan_meters(plan) if m in index and grant.shows(m)]
            since = bucket_start(Window.DAY, now) - timedelta(days=DAYS - 1)
            month = bucket_start(Window.MONTH, now)
            series, rankings = await asyncio.gather(
                asyncio.gather(*(self._series(customer, m, since, now) for m in shown)),
                asyncio.gather(
                    *(self._ranking(customer, m, month, now) for m in shown if _ranked(m))
                ),
            )
        finally:
            billing = await billed
        return Dashboard(
            customer=customer,
            plan=status.plan,
            status=status.status,
            as_of=status.as_of,
            bars=_quotas(status, grant, index) + _included(plan, billing.upcoming, grant, index),
            rates=_rates(status),
            series=list(series),
            rankings=list(rankings),
            since=since,
            period_start=month,
            money=_money(billing.upcoming, grant),
            invoices=None if billing.invoices is None else billing.invoices.invoices,
            alerts=_alerts(billing, grant),
            endpoints=None if billing.endpoints is None else billing.endpoints.endpoints,
            allowances_known=billing.upcoming is not None,
        )

    async def _series(self, customer: str, meter: Meter, since: datetime, now: datetime) -> Series:
        cells = await self._usage.read(customer, meter, Window.DAY, since, now, False, now)
        days = [(p.start, p.value) for p in cells.points(meter, False)]
        return Series(meter.name, meter.unit, days)

    async def _ranking(
        self, customer: str, meter: Meter, month: datetime, now: datetime
    ) -> Ranking:
        cells = await self._usage.read(customer, meter, Window.DAY, month, now, True, now)
        top = ranking.top(meter, cells, TOP)
        return Ranking(meter.name, meter.group_names, [(t.groups, t.value) for t in top])


def _plan_meters(plan: Plan | None) -> list[str]:
    """The meters a plan bounds or prices, each once, in the order the plan names them."""
    if plan is None:
        return []
    return list(dict.fromkeys([*plan.quotas, *plan.prices]))


def _quotas(status: LimitsStatus, grant: Grant, index: dict[str, Meter]) -> list[Bar]:
    return [
        Bar(
            meter=p.meter,
            name=p.policy,
            used=p.used,
            limit=p.limit,
            remaining=p.remaining,
            resets_at=status.as_of + timedelta(milliseconds=p.reset_ms),
            unit=_unit(index, p.meter),
            hard=p.hard,
        )
        for p in status.limits
        if p.kind == "quota" and p.meter is not None and grant.shows(p.meter)
    ]


def _included(
    plan: Plan | None, upcoming: UpcomingInvoice | None, grant: Grant, index: dict[str, Meter]
) -> list[Bar]:
    """A bar for each priced meter with included units and no quota (a quota's bar says
    it already): used is the invoice to date's quantity on the current plan."""
    if plan is None or upcoming is None:
        return []
    invoice, bars = upcoming.invoice, []
    for meter, price in plan.prices.items():
        included = price.included
        if not isinstance(included, Decimal) or included <= 0:
            continue
        if meter in plan.quotas or not grant.shows(meter):
            continue
        used = sum(
            (
                line.quantity
                for line in invoice.lines
                if line.kind is LineKind.USAGE and line.meter == meter and line.plan == plan.id
            ),
            Decimal(0),
        )
        remaining = max(included - used, Decimal(0))
        bars.append(
            Bar(
                meter,
                "included",
                used,
                included,
                remaining,
                invoice.period_end,
                _unit(index, meter),
            )
        )
    return bars


def _unit(index: dict[str, Meter], meter: str) -> str:
    found = index.get(meter)
    return found.unit if found else ""


def _rates(status: LimitsStatus) -> list[Rate]:
    return [
        Rate(
            policy=p.policy,
            limit=p.limit,
            window_seconds=-(-p.window_ms // 1000),
            remaining=p.remaining,
            endpoint=p.endpoint,
            algorithm=p.algorithm,
        )
        for p in status.limits
        if p.kind == "rate"
    ]


def _money(upcoming: UpcomingInvoice | None, grant: Grant) -> Money | None:
    if upcoming is None:
        return None
    invoice, forecast = upcoming.invoice, upcoming.forecast
    usage = [line for line in forecast.lines if line.kind is LineKind.USAGE]
    meters: dict[str, MeterMoney] = {}
    for line in usage:
        if line.meter is None or not grant.shows(line.meter):
            continue
        before = meters.get(line.meter) or MeterMoney(line.meter, *(Decimal(0),) * 5)
        meters[line.meter] = MeterMoney(
            line.meter,
            before.quantity,
            before.amount,
            before.forecast_quantity + line.quantity,
            before.forecast_billable + line.billable,
            before.forecast_amount + line.amount,
        )
    for line in invoice.lines:
        if line.kind is LineKind.USAGE and line.meter in meters:
            before = meters[line.meter]
            meters[line.meter] = MeterMoney(
                line.meter,
                before.quantity + line.quantity,
                before.amount + line.amount,
                before.forecast_quantity,
                before.forecast_billable,
                before.forecast_amount,
            )
    return Money(
        currency=invoice.currency,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
        to_date=invoice.total,
        forecast=forecast.total,
        overage=sum((line.amount for line in usage), Decimal(0)),
        method=forecast.method,
        meters=list(meters.values()),
    )


def _alerts(billing: BillingView, grant: Grant) -> list[AlertRule] | None:
    if billing.alerts is None:
        return None
    return [  # a whole-invoice spend rule (no meter) only to a grant of every meter
        rule
        for rule in billing.alerts.alerts
        if (grant.meters is None if rule.meter is None else grant.shows(rule.meter))
    ]


def _ranked(meter: Meter) -> bool:
    """Grouped meters get a top list, except averages: an average over a month's buckets
    needs their counts (``services.api.usage.ranking``)."""
    return bool(meter.group_by) and meter.aggregation is not Aggregation.AVG
