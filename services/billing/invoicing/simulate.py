"""``tally rate``: a plan from a catalog file applied to usage you type in.

The billing lead tries a price change here before shipping it; the lines come from the
same functions the billing run calls, so what this prints is what an invoice would say.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation

from schemas.catalog import Catalog
from schemas.invoices import Invoice
from services.billing.invoicing import compose as invoicing
from services.billing.invoicing.compose import Span, Stretch, midnight
from services.billing.invoicing.periods import period_containing


def parse_usage(pairs: list[str]) -> dict[str, Decimal]:
    """``meter=quantity`` pairs; ValueError naming the bad one."""
    usage: dict[str, Decimal] = {}
    for pair in pairs:
        meter, sep, raw = pair.partition("=")
        try:
            quantity = Decimal(raw)
        except InvalidOperation:
            quantity = Decimal("NaN")
        if not sep or not meter or not quantity.is_finite() or quantity < 0:
            raise ValueError(f"--usage {pair!r}: expected meter=quantity, a number >= 0")
        if meter in usage:
            raise ValueError(f"--usage {meter!r} is given twice")
        usage[meter] = quantity
    return usage


def simulate(
    catalog: Catalog,
    plan_id: str,
    usage: Mapping[str, Decimal],
    period_days: int | None = None,
    today: date | None = None,
) -> Invoice:
    """The invoice ``plan_id`` would produce for ``usage`` over its current period, or over
    the last ``period_days`` days of it (the fee prorated, usage rated as given)."""
    plans = {p.id: p for p in catalog.plans}
    if plan_id not in plans:
        raise ValueError(f"unknown plan {plan_id!r}; the catalog has {', '.join(sorted(plans))}")
    plan = plans[plan_id]
    unpriced = sorted(set(usage) - set(plan.prices))
    if unpriced:
        raise ValueError(
            f"plan {plan_id!r} prices no {', '.join(unpriced)}; it prices"
            f" {', '.join(sorted(plan.prices)) or 'no meters'}"
        )
    today = today or date.today()
    period = period_containing(midnight(today), today.replace(day=1), plan.cycle, plan.interval)
    start = period.start
    if period_days is not None:
        if not 0 < period_days <= period.seconds // 86400:
            raise ValueError(f"--period-days must be 1 to {period.seconds // 86400} for {plan_id}")
        start = period.end - timedelta(days=period_days)
    stretch = Stretch(plan.id, start.date(), period.end.date())
    lines = invoicing.lines(
        [Span(plan.id, start, period.end)],
        [stretch],
        {(0, meter): quantity for meter, quantity in usage.items()},
        plans,
        lambda _plan, _instant: period,
    )
    return invoicing.invoice("simulation", period, plan.currency, lines)
