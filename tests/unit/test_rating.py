"""The rating engine against Stripe's worked examples and a deliberately naive model.

The naive model prices whole units one at a time, the way the rules read in words; the
engine works tier by tier in exact decimals.  They must agree to the last digit.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.catalog import Catalog
from schemas.plans import Plan, Price, PriceModel, Tier
from services.billing.rating import engine as rating
from services.billing.rating.money import minor_units, round_line

D = Decimal
TYPOGRAPHIC = (  # docs.stripe.com/subscriptions/pricing-models/tiered-pricing
    Tier(up_to=D(5), unit_price=D(7)),
    Tier(up_to=D(10), unit_price=D("6.5")),
    Tier(up_to=None, unit_price=D(6)),
)


@pytest.mark.parametrize(
    ("fonts", "expected"), [(1, "7"), (5, "35"), (6, "39"), (20, "120"), (25, "150")]
)
def test_stripe_volume_example(fonts: int, expected: str) -> None:
    price = Price(model=PriceModel.VOLUME, tiers=TYPOGRAPHIC)
    assert rating.rate(price, D(fonts)).amount == D(expected)


@pytest.mark.parametrize(
    ("fonts", "expected"), [(1, "7"), (5, "35"), (6, "41.5"), (20, "127.5"), (25, "157.5")]
)
def test_stripe_graduated_example(fonts: int, expected: str) -> None:
    price = Price(model=PriceModel.GRADUATED, tiers=TYPOGRAPHIC)
    assert rating.rate(price, D(fonts)).amount == D(expected)


def test_graduated_flat_price_is_charged_once_per_tier_reached() -> None:
    tiers = (
        Tier(up_to=D(10), unit_price=D(0), flat_price=D(20)),
        Tier(up_to=None, unit_price=D(1), flat_price=D(5)),
    )
    price = Price(model=PriceModel.GRADUATED, tiers=tiers)
    assert rating.rate(price, D(3)).amount == D(20)
    assert rating.rate(price, D(12)).amount == D(27)
    assert rating.rate(price, D(0)).amount == D(0)


def test_package_rounds_started_blocks_up() -> None:
    price = Price(model=PriceModel.PACKAGE, unit_price=D(5), package_size=D(100))
    assert [rating.rate(price, D(q)).amount for q in (0, 1, 100, 101)] == [0, 5, 5, 10]


def test_included_units_come_off_first_and_minimum_applies_to_any_usage() -> None:
    price = Price(unit_price=D("0.001"), included=D(50_000), minimum=D(10))
    assert rating.rate(price, D(40_000)).billable == 0
    assert rating.rate(price, D(40_000)).amount == D(10)
    assert rating.rate(price, D(70_000)).amount == D(20)


def test_unlimited_is_never_charged() -> None:
    price = Price(unit_price=D(1), included="unlimited")
    rated = rating.rate(price, D(10**12))
    assert (rated.billable, rated.amount) == (D(0), D(0))
    assert rating.describe(price, "usd") == "unlimited, included"


def test_brief_tiers_as_the_billing_lead_computes_them() -> None:
    plans = {p.id: p for p in Catalog.default().plans}
    assert _amount(plans["starter"], "api_calls", 65_000) == D("15.00")
    assert _amount(plans["pro"], "api_calls", 500_001) == D("0.00")  # 0.0005 rounds down
    assert _amount(plans["pro"], "api_calls", 500_003) == D("0.00")
    assert _amount(plans["pro"], "api_calls", 500_010) == D("0.01")  # 0.005 rounds up
    assert _amount(plans["enterprise"], "api_calls", 10_000_000) == D("1000.00")
    # payg: 90,000 x 0.001 + 900,000 x 0.0005 + 9,000,000 x 0.0002
    assert _amount(plans["payg"], "api_calls", 10_000_000) == D("2340.00")
    # payg storage: 95 x 0.25 + 50 x 0.15; compute: (7200 - 3600) x 0.005
    assert _amount(plans["payg"], "storage_gb", 150) == D("31.25")
    assert _amount(plans["payg"], "compute_seconds", 7200) == D("18.00")


def test_lines_round_half_up_to_the_currency_minor_unit() -> None:
    assert round_line(D("0.005"), "usd") == D("0.01")
    assert round_line(D("0.0049999"), "usd") == D("0.00")
    assert round_line(D("2.5"), "jpy") == D("3")
    assert round_line(D("1.0005"), "kwd") == D("1.001")
    assert minor_units(D("12.345"), "usd") == 1235


def _amount(plan: Plan, meter: str, quantity: int) -> Decimal:
    return rating.usage_line(plan, meter, D(quantity), *_period()).amount


def _period() -> tuple[datetime, datetime]:
    return datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)


# --- the naive model ------------------------------------------------------------------


def naive(price: Price, quantity: int) -> Decimal:
    """Whole units, one at a time, straight from the rules in words."""
    included = 0 if price.included == "unlimited" else int(price.included)
    billable = 0 if price.included == "unlimited" else max(0, quantity - included)
    amount = D(0)
    if billable == 0:
        pass
    elif price.model is PriceModel.PER_UNIT:
        for _ in range(billable):
            amount += price.unit_price or D(0)
    elif price.model is PriceModel.PACKAGE:
        amount = math.ceil(billable / int(price.package_size or 1)) * (price.unit_price or D(0))
    elif price.model is PriceModel.GRADUATED:
        reached = set()
        for unit in range(1, billable + 1):
            index = _tier_of(price.tiers, unit)
            amount += price.tiers[index].unit_price
            reached.add(index)
        amount += sum((price.tiers[i].flat_price for i in reached), D(0))
    else:
        tier = price.tiers[_tier_of(price.tiers, billable)]
        for _ in range(billable):
            amount += tier.unit_price
        amount += tier.flat_price
    return max(amount, price.minimum)


def _tier_of(tiers: tuple[Tier, ...], unit: int) -> int:
    for index, tier in enumerate(tiers):
        if tier.up_to is None or unit <= tier.up_to:
            return index
    raise AssertionError("the last tier is unbounded")


money = st.decimals(min_value=0, max_value=10, places=4)


@st.composite
def prices(draw: st.DrawFn) -> Price:
    model = draw(st.sampled_from(list(PriceModel)))
    included = draw(st.one_of(st.just("unlimited"), st.integers(0, 50).map(D)))
    minimum = draw(st.sampled_from([D(0), D("0.5"), D(30)]))
    if model in (PriceModel.GRADUATED, PriceModel.VOLUME):
        bounds = sorted(draw(st.sets(st.integers(1, 300), max_size=4)))
        tiers = tuple(
            Tier(
                up_to=D(b) if b is not None else None,
                unit_price=draw(money),
                flat_price=draw(st.sampled_from([D(0), D(0), draw(money)])),
            )
            for b in [*bounds, None]
        )
        return Price(model=model, tiers=tiers, included=included, minimum=minimum)
    size = D(draw(st.integers(1, 40))) if model is PriceModel.PACKAGE else None
    return Price(
        model=model,
        unit_price=draw(money),
        package_size=size,
        included=included,
        minimum=minimum,
    )


@settings(max_examples=300, deadline=None)
@given(price=prices(), quantity=st.integers(0, 600))
def test_engine_agrees_with_the_naive_model(price: Price, quantity: int) -> None:
    assert rating.rate(price, D(quantity)).amount == naive(price, quantity)


@settings(max_examples=200, deadline=None)
@given(price=prices(), quantity=st.integers(0, 600))
def test_tranches_add_up_and_the_line_is_rounded_once(price: Price, quantity: int) -> None:
    rated = rating.rate(price, D(quantity))
    assert sum((t.amount for t in rated.tranches), D(0)) == rated.amount or rated.amount == (
        price.minimum
    )
    plan = Plan(id="p", name="P", prices={"m": price})
    line = rating.usage_line(plan, "m", D(quantity), *_period())
    assert line.amount == rated.amount.quantize(D("0.01"), rounding=ROUND_HALF_UP)


@settings(max_examples=200, deadline=None)
@given(price=prices(), low=st.integers(0, 600), extra=st.integers(0, 600))
def test_more_usage_never_costs_less_except_under_volume(
    price: Price, low: int, extra: int
) -> None:
    if price.model is PriceModel.VOLUME:
        return
    assert rating.rate(price, D(low + extra)).amount >= rating.rate(price, D(low)).amount
