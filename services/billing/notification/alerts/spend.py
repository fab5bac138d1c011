"""A spend threshold as a usage level: the least usage at which the invoice to date
reaches an amount.

The aggregator compares micro-unit totals, not money, so a spend alert is compiled into
a quantity by searching the rating engine itself (Decimal, exact): whatever the price
model, the threshold fires exactly where the invoice would first show that amount.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal

from schemas.events import VALUE_DECIMALS
from schemas.plans import Plan, Price, PriceModel
from services.billing.rating.engine import rate
from services.billing.rating.money import round_line

MAX_MICROS = 9 * 10**18
"""The largest month total the aggregator's counters hold (below 2^63)."""


def charge(plan: Plan, meter: str, quantity: Decimal) -> Decimal:
    """The period's invoice to date for one meter: the plan's fee plus the usage line,
    each rounded as an invoice rounds it."""
    usage = rate(plan.prices[meter], quantity).amount
    return round_line(plan.price, plan.currency) + round_line(usage, plan.currency)


def micros_for(plan: Plan, meter: str, amount: Decimal) -> int | None:
    """The least usage, in micro-units, at which ``charge`` reaches ``amount``; None
    when no usage ever does (a free meter, an amount beyond the counters' range)."""

    def reaches(micros: int) -> bool:
        return charge(plan, meter, _units(micros)) >= amount

    for low, high in _monotone_stretches(plan.prices[meter]):
        if reaches(high):
            while low < high:  # the least micros in [low, high] that reaches the amount
                middle = (low + high) // 2
                if reaches(middle):
                    high = middle
                else:
                    low = middle + 1
            return low
    return None


def _monotone_stretches(price: Price) -> Iterator[tuple[int, int]]:
    """Ranges of usage (micro-units, inclusive) over which the charge never decreases.

    Every model but volume never decreases at all; a volume price can drop where a
    cheaper tier starts, so each of its tiers is a stretch of its own.
    """
    low, included = 0, price.included
    if price.model is PriceModel.VOLUME and isinstance(included, Decimal):
        for tier in price.tiers:
            if tier.up_to is None:
                break
            high = min(ceil_micros(included + tier.up_to), MAX_MICROS)
            yield low, high
            low = high + 1
    yield low, MAX_MICROS


def ceil_micros(units: Decimal) -> int:
    """Units as micro-units, rounded up: a level of 0.0000005 is reached at 0.000001."""
    return int(units.scaleb(VALUE_DECIMALS).to_integral_value(ROUND_CEILING))


def _units(micros: int) -> Decimal:
    return Decimal(micros).scaleb(-VALUE_DECIMALS)
