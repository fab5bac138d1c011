"""One customer's invoice for one period, from its subscription history and usage.

Pure: the billing run and the upcoming invoice read the history and usage, then call
:func:`fee_stretches`, :func:`usage_stretches` and :func:`lines`.

How a period is split when the plan or status changes inside it:

- The recurring fee accrues by the second while the account is ``active`` or
  ``past_due``, under the plan of the moment: one prorated line per plan.
- Usage is rated per day — a day of the customer's billing time zone, UTC unless it has
  one — so a day's usage belongs to the plan and status in effect at the end of that
  day.  Days that end in a trial are not charged.  Each
  unbroken stretch of days on one plan is rated on its own, with that plan's full
  included units and tiers — as Stripe rates a price's usage when the price changes
  mid-period.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, localcontext
from zoneinfo import ZoneInfo

from pydantic import TypeAdapter

from schemas.invoices import Invoice, InvoiceLine
from schemas.plans import Plan
from services.billing.invoicing.periods import UTC_ZONE, Period
from services.billing.rating import engine as rating
from services.billing.rating.money import EXACT

LINES = TypeAdapter(tuple[InvoiceLine, ...])  # as ``invoices.lines`` stores them (jsonb)
FEE_STATUSES = frozenset({"active", "past_due"})
FREE_STATUSES = frozenset({"trial"})


@dataclass(frozen=True, slots=True)
class State:
    """A subscription's plan and status from ``at`` on (one row of its history)."""

    at: datetime
    plan: str
    status: str


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of time on one plan: the fee's unit of proration."""

    plan: str
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class Stretch:
    """The days [first_day, end_day) of ``tz`` whose usage is rated under one plan."""

    plan: str
    first_day: date
    end_day: date
    tz: ZoneInfo = UTC_ZONE

    @property
    def start(self) -> datetime:
        return midnight(self.first_day, self.tz)

    @property
    def end(self) -> datetime:
        return midnight(self.end_day, self.tz)


@dataclass(frozen=True, slots=True)
class Carried:
    """A charge for a finalized invoice's corrected usage, waiting for the customer's
    next invoice (``corrections``): its lines follow the period's own."""

    id: str
    period_end: datetime  # of the corrected invoice
    lines: tuple[InvoiceLine, ...]


Usage = Mapping[tuple[int, str], Decimal]  # (stretch index, meter) -> period quantity
PeriodOf = Callable[[Plan, datetime], Period]  # the plan's own period around an instant


def fee_stretches(period: Period, states: Sequence[State], until: datetime) -> list[Span]:
    """The spans of time the recurring fee accrues, one per unbroken plan."""
    merged: list[Span] = []
    for state, start, end in _clip(period, states, until):
        if state.status not in FEE_STATUSES:
            continue
        if merged and merged[-1].plan == state.plan and merged[-1].end == start:
            start = merged.pop().start
        merged.append(Span(state.plan, start, end))
    return merged


def usage_stretches(period: Period, states: Sequence[State], until: datetime) -> list[Stretch]:
    """The days whose usage is charged, grouped into unbroken stretches per plan."""
    tz = period.tz
    last_day = ceil_day(until, tz)
    merged: list[Stretch] = []
    for state, start, end in _clip(period, states, until):
        first_day = start.astimezone(tz).date()
        end_day = last_day if end == until else end.astimezone(tz).date()
        if state.status in FREE_STATUSES or first_day >= end_day:
            continue
        if merged and merged[-1].plan == state.plan and merged[-1].end_day == first_day:
            first_day = merged.pop().first_day
        merged.append(Stretch(state.plan, first_day, end_day, tz))
    return merged


def _clip(
    period: Period, states: Sequence[State], until: datetime
) -> list[tuple[State, datetime, datetime]]:
    """Each state with the part of [period.start, until) it was in effect for."""
    clipped = []
    for i, state in enumerate(states):
        start = max(state.at, period.start)
        end = min(states[i + 1].at if i + 1 < len(states) else until, until)
        if start < end:
            clipped.append((state, start, end))
    return clipped


def lines(
    fees: Iterable[Span],
    stretches: Sequence[Stretch],
    usage: Usage,
    plans: Mapping[str, Plan],
    period_of: PeriodOf,
) -> list[InvoiceLine]:
    """Fee lines, then one usage line per priced meter and stretch."""
    out = []
    for span in fees:
        plan = plans[span.plan]
        if plan.price:
            own = period_of(plan, span.start)
            with localcontext(EXACT):
                share = Decimal((span.end - span.start).total_seconds()) / own.seconds
            out.append(rating.fee_line(plan, min(share, Decimal(1)), span.start, span.end))
    for index, stretch in enumerate(stretches):
        plan = plans[stretch.plan]
        for meter in sorted(plan.prices):
            quantity = usage.get((index, meter), Decimal(0))
            out.append(rating.usage_line(plan, meter, quantity, stretch.start, stretch.end))
    return out


def invoice(customer: str, period: Period, currency: str, lines: Sequence[InvoiceLine]) -> Invoice:
    """The invoice these lines make: its total is the sum of the rounded lines."""
    subtotal = rating.total(lines)
    return Invoice(
        customer=customer,
        period=period.label,
        period_start=period.start,
        period_end=period.end,
        currency=currency,
        lines=tuple(lines),
        subtotal=subtotal,
        total=subtotal,
    )


def midnight(day: date, tz: ZoneInfo = UTC_ZONE) -> datetime:
    """The start of ``day`` in ``tz`` (its offset the one in force that day), in UTC:
    instants to subtract, never wall clocks."""
    return datetime.combine(day, time(), tz).astimezone(UTC)


def ceil_day(instant: datetime, tz: ZoneInfo = UTC_ZONE) -> date:
    """The first day of ``tz`` starting at or after ``instant``."""
    day = instant.astimezone(tz).date()
    return day if midnight(day, tz) == instant else day + timedelta(days=1)
