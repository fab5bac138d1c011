"""The rating engine: a plan's prices applied to usage, exactly.

Pure functions, Decimal throughout, no I/O: the billing run, the upcoming-invoice
forecast and ``tally rate`` all call these, so a price change tried in the simulator is
the price the invoice will charge.

Rules (the README repeats them):

- ``included`` units are taken off the period's quantity first; the price model prices
  what remains (``billable``).
- per_unit: billable * unit_price.  package: unit_price per started block of
  ``package_size``.  graduated: each unit at the rate of the tier it falls in, plus the
  flat price of every tier reached.  volume: every unit at the rate of the tier the
  total falls in, plus that tier's flat price.  Tier bounds (``up_to``) are inclusive.
  No billable units, no charge — flat prices included.
- ``minimum``: the line costs at least this, usage or not.
- The recurring fee is prorated by time: price * (seconds covered / seconds in the period).
- Each line is rounded once, half up, to the currency's minor unit; totals add lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal, localcontext

from schemas.invoices import InvoiceLine, LineKind, Tranche
from schemas.plans import UNLIMITED, Plan, Price, PriceModel, Tier
from services.billing.rating.money import EXACT, round_line

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Rated:
    """One meter's usage priced, before rounding."""

    billable: Decimal
    amount: Decimal
    tranches: tuple[Tranche, ...]


def rate(price: Price, quantity: Decimal) -> Rated:
    """Price ``quantity`` units of usage under ``price``; the amount is exact."""
    with localcontext(EXACT):
        included = price.included
        billable = max(ZERO, quantity - included) if isinstance(included, Decimal) else ZERO
        tranches = _tranches(price, billable) if billable else ()
        amount = sum((t.amount for t in tranches), ZERO)
        return Rated(billable, max(amount, price.minimum), tranches)


def _tranches(price: Price, billable: Decimal) -> tuple[Tranche, ...]:
    match price.model:
        case PriceModel.PER_UNIT:
            return (_tranche(billable, _unit_price(price)),)
        case PriceModel.PACKAGE:
            assert price.package_size is not None  # the Price model guarantees it
            blocks = (billable / price.package_size).to_integral_value(ROUND_CEILING)
            return (_tranche(blocks, _unit_price(price)),)
        case PriceModel.GRADUATED:
            return tuple(_graduated(price.tiers, billable))
        case PriceModel.VOLUME:
            tier = next(t for t in price.tiers if t.up_to is None or billable <= t.up_to)
            return (_tranche(billable, tier.unit_price, tier.flat_price),)


def _graduated(tiers: Iterable[Tier], billable: Decimal) -> Iterable[Tranche]:
    floor = ZERO
    for tier in tiers:
        if billable <= floor:
            return
        ceiling = billable if tier.up_to is None else min(billable, tier.up_to)
        yield _tranche(ceiling - floor, tier.unit_price, tier.flat_price)
        floor = ceiling


def _tranche(quantity: Decimal, unit_price: Decimal, flat_price: Decimal = ZERO) -> Tranche:
    return Tranche(
        quantity=quantity,
        unit_price=unit_price,
        flat_price=flat_price,
        amount=quantity * unit_price + flat_price,
    )


def _unit_price(price: Price) -> Decimal:
    assert price.unit_price is not None  # the Price model guarantees it
    return price.unit_price


def usage_line(
    plan: Plan, meter: str, quantity: Decimal, start: datetime, end: datetime
) -> InvoiceLine:
    """The invoice line for ``quantity`` of ``meter`` used on ``plan`` between start and end."""
    price = plan.prices[meter]
    rated = rate(price, quantity)
    return InvoiceLine(
        kind=LineKind.USAGE,
        plan=plan.id,
        meter=meter,
        description=f"{meter} on {plan.name}: {describe(price, plan.currency)}",
        start=start,
        end=end,
        quantity=quantity,
        billable=rated.billable,
        amount=round_line(rated.amount, plan.currency),
        tranches=rated.tranches,
    )


def fee_line(plan: Plan, share: Decimal, start: datetime, end: datetime) -> InvoiceLine:
    """The recurring fee for the ``share`` (0-1) of a billing period between start and end."""
    with localcontext(EXACT):
        exact = plan.price * share
    prorated = "" if share == 1 else f", prorated ({share:.4%} of the period)"
    return InvoiceLine(
        kind=LineKind.FEE,
        plan=plan.id,
        description=f"{plan.name}: {_money(plan.price, plan.currency)} per {plan.interval}"
        + prorated,
        start=start,
        end=end,
        quantity=share,
        billable=share,
        amount=round_line(exact, plan.currency),
    )


def total(lines: Iterable[InvoiceLine]) -> Decimal:
    return sum((line.amount for line in lines), ZERO)


def describe(price: Price, currency: str) -> str:
    """The price in words, as an invoice line shows it."""
    if price.included == UNLIMITED:
        return "unlimited, included"
    parts = [f"first {price.included:,} included"] if price.included else []
    match price.model:
        case PriceModel.PER_UNIT:
            parts.append(f"{_money(_unit_price(price), currency)} per unit")
        case PriceModel.PACKAGE:
            parts.append(
                f"{_money(_unit_price(price), currency)} per {price.package_size:,} units started"
            )
        case PriceModel.GRADUATED | PriceModel.VOLUME:
            tiers = "; ".join(_tier_words(t, currency) for t in price.tiers)
            parts.append(f"{price.model} tiers: {tiers}")
    if price.minimum:
        parts.append(f"minimum {_money(price.minimum, currency)}")
    return ", ".join(parts)


def _tier_words(tier: Tier, currency: str) -> str:
    bound = "beyond" if tier.up_to is None else f"up to {tier.up_to:,}"
    flat = f" + {_money(tier.flat_price, currency)} flat" if tier.flat_price else ""
    return f"{bound} at {_money(tier.unit_price, currency)}{flat}"


def _money(amount: Decimal, currency: str) -> str:
    return f"{amount.normalize():f} {currency.upper()}"
