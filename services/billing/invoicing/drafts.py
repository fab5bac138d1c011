"""Invoices drafted for many customers at once: the step the billing run and the
upcoming invoice share.  One usage query serves a whole batch of customers."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from psycopg import AsyncConnection

from schemas.catalog import Meter
from schemas.invoices import Invoice, InvoiceLine
from schemas.plans import Plan
from services.billing.invoicing import compose as invoicing
from services.billing.invoicing import period_usage
from services.billing.invoicing.compose import LINES, Carried, Span, Stretch
from services.billing.invoicing.periods import Period, period_containing, period_in_month
from services.billing.invoicing.subscriptions import PlanBook, Subscription
from services.common.clickhouse import ClickHouse


@dataclass(frozen=True, slots=True)
class Ask:
    """Draft ``subscription``'s invoice for ``period`` with what happened before ``until``."""

    subscription: Subscription
    period: Period
    until: datetime


@dataclass(frozen=True, slots=True)
class Draft:
    ask: Ask
    plans: Mapping[str, Plan]
    fees: Sequence[Span]
    stretches: Sequence[Stretch]
    usage: Mapping[tuple[int, str], Decimal]  # (stretch index, meter) -> quantity
    carried: tuple[Carried, ...] = ()  # charges of corrected invoices it bills

    @property
    def currency(self) -> str:
        return self.plans[self.ask.subscription.state_at(self.ask.until).plan].currency

    def lines(self) -> list[InvoiceLine]:
        anchor = self.ask.subscription.anchor

        tz = self.ask.period.tz

        def period_of(plan: Plan, instant: datetime) -> Period:
            return period_containing(instant, anchor, plan.cycle, plan.interval, tz)

        own = invoicing.lines(self.fees, self.stretches, self.usage, self.plans, period_of)
        return own + [line for charge in self.carried for line in charge.lines]

    def invoice(self) -> Invoice:
        customer = self.ask.subscription.customer
        return invoicing.invoice(customer, self.ask.period, self.currency, self.lines())


class Drafter:
    def __init__(
        self,
        book: PlanBook,
        meters: Mapping[str, Meter],
        clickhouse: Callable[[], ClickHouse],
    ) -> None:
        self._book = book
        self._meters = meters
        self._clickhouse = clickhouse

    @property
    def clickhouse(self) -> Callable[[], ClickHouse]:
        """Where distinct-count meters are read (for the forecast's window too)."""
        return self._clickhouse

    async def draft(self, conn: AsyncConnection, asks: Sequence[Ask]) -> list[Draft]:
        """Every ask's draft, with one usage query for all of them."""
        shapes = [self._shape(ask) for ask in asks]
        wanted: list[period_usage.Wanted] = []
        offsets = []
        for ask, (plans, _, stretches) in zip(asks, shapes, strict=True):
            offsets.append(len(wanted))
            customer = ask.subscription.customer
            wanted += [(customer, s.start, s.end, tuple(plans[s.plan].prices)) for s in stretches]
        found = await period_usage.quantities(conn, self._clickhouse, self._meters, wanted)
        waiting = await _carried(conn, [ask.subscription.customer for ask in asks])
        drafts = []
        for ask, (plans, fees, stretches), offset in zip(asks, shapes, offsets, strict=True):
            mine = {
                (i, meter): found[offset + i, meter]
                for i, stretch in enumerate(stretches)
                for meter in plans[stretch.plan].prices
                if (offset + i, meter) in found
            }
            due = _due(waiting.get(ask.subscription.customer, ()), ask.period)
            drafts.append(Draft(ask, plans, fees, stretches, mine, due))
        return drafts

    def plan_at(self, subscription: Subscription, instant: datetime) -> Plan:
        """The subscription's plan at ``instant``, as it was defined then."""
        return self._book.at(subscription.state_at(instant).plan, instant)

    def period_in(self, subscription: Subscription, month: date) -> Period | None:
        """The subscription's period starting in ``month``, shaped by the plan it had then."""
        tz = subscription.tz
        plan = self.plan_at(subscription, invoicing.midnight(month, tz))
        return period_in_month(month, subscription.anchor, plan.cycle, plan.interval, tz)

    def _shape(self, ask: Ask) -> tuple[dict[str, Plan], list[Span], list[Stretch]]:
        states = ask.subscription.states
        as_of = min(ask.until, ask.period.end)
        plans = {s.plan: self._book.at(s.plan, as_of) for s in states}
        fees = invoicing.fee_stretches(ask.period, states, ask.until)
        stretches = invoicing.usage_stretches(ask.period, states, ask.until)
        return plans, fees, stretches


async def _carried(conn: AsyncConnection, customers: Sequence[str]) -> dict[str, list[Carried]]:
    """Each customer's charges not yet on a finalized invoice, oldest first."""
    cur = await conn.execute(
        "SELECT customer_id, id, period_end, lines FROM invoice_corrections"
        " WHERE kind = 'charge' AND billed_on IS NULL AND customer_id = ANY(%s)"
        " ORDER BY created_at, id",
        (list(customers),),
    )
    found: dict[str, list[Carried]] = defaultdict(list)
    for customer, ident, end, raw in await cur.fetchall():
        found[customer].append(Carried(ident, end, LINES.validate_python(raw)))
    return found


def _due(charges: Iterable[Carried], period: Period) -> tuple[Carried, ...]:
    """The charges an invoice for ``period`` carries: those of periods ended by its start."""
    return tuple(c for c in charges if c.period_end <= period.start)
