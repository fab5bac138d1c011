"""Reading invoices, and the upcoming one: the current period so far plus a forecast.

The forecast assumes the plan and status of the moment last to the period's end and
the usage keeps its recent pace (``pace``: the last seven days' rate, never measured
over less than a day; maxima, latest values and distinct counts stay) — the figure the
period-end warning, quota alerts and dashboards can show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from schemas.catalog import ADDITIVE, Meter
from schemas.invoices import Forecast, Invoice, InvoiceStatus, UpcomingInvoice
from schemas.plans import Plan
from services.billing.invoicing import compose as invoicing
from services.billing.invoicing import pace, period_usage, subscriptions
from services.billing.invoicing.drafts import Ask, Draft, Drafter
from services.billing.invoicing.periods import Period, period_containing
from services.billing.rating import engine as rating
from services.common import catalog
from services.common.clickhouse import ClickHouse

_COLUMNS = (
    "id, customer_id AS customer, period, period_start, period_end, status, currency,"
    " lines, subtotal, total, computed_at, finalized_at"
)


async def listed(
    conn: AsyncConnection,
    customer: str,
    status: InvoiceStatus | None = None,
    limit: int = 24,
) -> list[Invoice]:
    """The customer's invoices, newest period first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM invoices WHERE customer_id = %s"
            " AND (%s::text IS NULL OR status = %s) ORDER BY period_start DESC LIMIT %s",
            (customer, status, status, limit),
        )
        return [Invoice.model_validate(row) for row in await cur.fetchall()]


@dataclass(frozen=True, slots=True)
class Outlook:
    """A customer's current period: the invoice so far and the same at its end, forecast."""

    period: Period
    plan: Plan  # the plan in effect now
    so_far: Draft
    whole: Draft  # the usage forecast to the period's end, at its recent pace
    as_of: datetime

    def upcoming(self) -> UpcomingInvoice:
        lines = tuple(self.whole.lines())
        return UpcomingInvoice(
            invoice=self.so_far.invoice(),
            forecast=Forecast(lines=lines, total=rating.total(lines), method=pace.METHOD),
            as_of=self.as_of,
        )


async def upcoming(
    conn: AsyncConnection,
    clickhouse: Callable[[], ClickHouse],
    customer: str,
    now: datetime,
) -> UpcomingInvoice | None:
    """The current period's invoice so far and its forecast; None for unknown customers."""
    subscription = await subscriptions.one(conn, customer)
    if subscription is None:
        return None
    meters = {m.name: m for m in await catalog.meters(conn)}
    drafter = Drafter(await subscriptions.plan_book(conn), meters, clickhouse)
    return (await outlook(conn, drafter, meters, subscription, now)).upcoming()


async def outlook(
    conn: AsyncConnection,
    drafter: Drafter,
    meters: Mapping[str, Meter],
    subscription: subscriptions.Subscription,
    now: datetime,
) -> Outlook:
    """The subscription's current period at ``now``, so far and forecast."""
    [found] = await outlooks(conn, drafter, meters, [subscription], now)
    return found


async def outlooks(
    conn: AsyncConnection,
    drafter: Drafter,
    meters: Mapping[str, Meter],
    batch: Sequence[subscriptions.Subscription],
    now: datetime,
) -> list[Outlook]:
    """Each subscription's current period at ``now``: two usage queries for the batch
    (the period so far, the pace windows)."""
    plans = [drafter.plan_at(s, now) for s in batch]
    periods = [
        period_containing(now, s.anchor, plan.cycle, plan.interval, s.tz)
        for s, plan in zip(batch, plans, strict=True)
    ]
    drafts = await drafter.draft(
        conn, [Ask(s, period, now) for s, period in zip(batch, periods, strict=True)]
    )
    paces = await _recent(conn, drafter.clickhouse, meters, drafts, now)
    aggregations = {name: meter.aggregation for name, meter in meters.items()}
    found = []
    for draft, plan, period, (recent, window) in zip(drafts, plans, periods, paces, strict=True):
        states = draft.ask.subscription.states
        usage = pace.forecast(draft.usage, recent, draft.stretches, aggregations, window, period)
        whole = dataclasses.replace(
            draft,
            fees=invoicing.fee_stretches(period, states, period.end),
            stretches=invoicing.usage_stretches(period, states, period.end),
            usage=usage,
        )
        found.append(Outlook(period, plan, draft, whole, now))
    return found


async def _recent(
    conn: AsyncConnection,
    clickhouse: Callable[[], ClickHouse],
    meters: Mapping[str, Meter],
    drafts: Sequence[Draft],
    now: datetime,
) -> list[tuple[dict[str, Decimal], pace.Window]]:
    """Each draft's pace window and the current stretch's usage over it, per additive
    priced meter: one query for the batch."""
    windows, wanted = [], []
    for draft in drafts:
        stretches, started = draft.stretches, draft.ask.subscription.states[0].at
        since = pace.since(stretches, started) if stretches else started
        window = pace.window(since, now, draft.ask.subscription.tz)
        windows.append(window)
        additive: list[str] = []
        if stretches:
            last = stretches[-1]
            priced = draft.plans[last.plan].prices
            additive = [m for m in priced if m in meters and meters[m].aggregation in ADDITIVE]
        first, end = window.first, stretches[-1].end if stretches else window.first
        wanted.append((draft.ask.subscription.customer, first, end, additive))
    found = await period_usage.quantities(conn, clickhouse, meters, wanted)
    recent: list[dict[str, Decimal]] = [{} for _ in drafts]
    for (index, meter), quantity in found.items():
        recent[index][meter] = quantity
    return list(zip(recent, windows, strict=True))
