"""Alert rules compiled into usage levels: percentages, absolute usage and spend.

Spend thresholds are checked against the rating engine itself: at the compiled level
the invoice to date reaches the amount, one micro-unit below it does not — for every
price model, graduated tiers with flat fees and volume tiers (whose charge can drop)
included.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.alerts import PLAN_RULE, AlertKind, Threshold, decode, encode
from schemas.catalog import Catalog
from schemas.events import VALUE_SCALE
from schemas.plans import AlertDefaults, Plan, Price, PriceModel, Quota, Tier
from services.billing.notification.alerts.compile import (
    RuleError,
    compiled,
    plan_thresholds,
    rule_thresholds,
)
from services.billing.notification.alerts.rules import Rule
from services.billing.notification.alerts.spend import charge, micros_for

D = Decimal
AT = datetime(2026, 12, 1, tzinfo=UTC)
PLANS = {p.id: p for p in Catalog.default().plans}
TIERED = Price(
    model=PriceModel.GRADUATED,
    included=D(100),
    tiers=(
        Tier(up_to=D(1000), unit_price=D("0.01")),
        Tier(up_to=D(5000), unit_price=D("0.005"), flat_price=D(3)),
        Tier(up_to=None, unit_price=D("0.001")),
    ),
)
VOLUME = Price(
    model=PriceModel.VOLUME,
    tiers=(
        Tier(up_to=D(10), unit_price=D(2)),
        Tier(up_to=D(100), unit_price=D(1)),
        Tier(up_to=None, unit_price=D("0.5")),
    ),
)


def rule(kind: AlertKind, *values: str, meter: str = "api_calls") -> Rule:
    return Rule("alr_1", meter, kind, tuple(D(v) for v in values), AT)


def levels(found: list[Threshold | None]) -> list[int | None]:
    return [None if t is None else t.quantity for t in found]


def test_the_default_catalog_alerts_at_80_90_100_percent_of_the_free_quota() -> None:
    found = plan_thresholds(PLANS["free"])
    assert list(found) == ["api_calls"]
    assert [(t.quantity, t.value, t.rule) for t in found["api_calls"]] == [
        (800 * VALUE_SCALE, D(80), PLAN_RULE),
        (900 * VALUE_SCALE, D(90), PLAN_RULE),
        (1000 * VALUE_SCALE, D(100), PLAN_RULE),
    ]
    assert all(t.limit == 1000 for t in found["api_calls"])
    assert plan_thresholds(PLANS["payg"]) == {}  # no quota, nothing included


def test_percent_is_of_the_quota_else_of_the_included_units() -> None:
    both = Plan(
        id="p",
        name="P",
        prices={"api_calls": Price(included=D(200), unit_price=D(1))},
        quotas={"api_calls": Quota(limit=D(300))},
    )
    included_only = both.model_copy(update={"quotas": {}})
    assert levels(rule_thresholds(both, rule(AlertKind.PERCENT, "50"))) == [150 * VALUE_SCALE]
    assert levels(rule_thresholds(included_only, rule(AlertKind.PERCENT, "50"))) == [
        100 * VALUE_SCALE
    ]
    # a fraction of a micro-unit rounds up: the level is reached, never passed by
    assert levels(rule_thresholds(both, rule(AlertKind.PERCENT, "0.0001"))) == [300]
    with pytest.raises(RuleError) as refused:
        rule_thresholds(PLANS["payg"], rule(AlertKind.PERCENT, "50"))
    assert refused.value.field == "meter"


def test_equal_levels_are_listed_once_and_plan_defaults_win() -> None:
    free = PLANS["free"]
    own = [rule(AlertKind.USAGE, "900", "500"), rule(AlertKind.PERCENT, "80", "45.5")]
    [meter] = compiled(free, own).items()
    found = decode(meter[1])
    assert [t.quantity // VALUE_SCALE for t in found] == [455, 500, 800, 900, 1000]
    assert [t.rule for t in found] == ["alr_1", "alr_1", PLAN_RULE, PLAN_RULE, PLAN_RULE]
    assert decode(encode(found)) == found


def test_a_rule_the_plan_cannot_take_is_left_out_of_the_compiled_levels() -> None:
    payg = PLANS["payg"]
    assert compiled(payg, [rule(AlertKind.PERCENT, "50")]) == {}
    with pytest.raises(RuleError):
        rule_thresholds(PLANS["free"], rule(AlertKind.SPEND, "5", meter="compute_seconds"))


def test_spend_includes_the_plan_fee_and_rounds_like_the_invoice() -> None:
    starter = PLANS["starter"]  # $49 a month, 50,000 calls included, then $0.001
    [level] = levels(rule_thresholds(starter, rule(AlertKind.SPEND, "50.00")))
    assert level == 50_995 * VALUE_SCALE  # 995 calls over: $0.995 rounds half up to $1.00
    [free] = levels(rule_thresholds(starter, rule(AlertKind.SPEND, "10")))
    assert free == 0  # the fee alone passes it: the first call fires it
    assert levels(rule_thresholds(PLANS["free"], rule(AlertKind.SPEND, "1"))) == [None]


def _plan(price: Price, fee: str = "0", currency: str = "usd") -> Plan:
    return Plan(
        id="p", name="P", price=D(fee), currency=currency, prices={"m": price},
        alerts=AlertDefaults(),
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    price=st.sampled_from([TIERED, VOLUME, Price(model=PriceModel.PACKAGE, unit_price=D(5),
                           package_size=D(100), included=D(7)),
                           Price(unit_price=D("0.0003"), minimum=D(2))]),
    fee=st.sampled_from(["0", "9.99"]),
    currency=st.sampled_from(["usd", "jpy"]),
    amount=st.decimals(min_value=D("0.01"), max_value=D(5000), places=2),
)  # fmt: skip
def test_spend_level_is_where_the_rating_engine_first_reaches_the_amount(
    price: Price, fee: str, currency: str, amount: Decimal
) -> None:
    plan = _plan(price, fee, currency)
    micros = micros_for(plan, "m", amount)
    assert micros is not None
    assert charge(plan, "m", D(micros).scaleb(-6)) >= amount
    if micros:
        assert charge(plan, "m", D(micros - 1).scaleb(-6)) < amount
        # and no smaller usage reaches it either (volume charges can drop): sample below
        for below in (micros // 2, micros // 3, micros - VALUE_SCALE):
            if below >= 0:
                assert charge(plan, "m", D(below).scaleb(-6)) < amount


def test_volume_spend_takes_the_first_usage_that_reaches_the_amount() -> None:
    plan = _plan(VOLUME)
    # 10 units cost $20, 11 cost $11: $15 is first reached in the first tier, at 7.4975
    # units ($14.995, rounded half up to $15.00)
    assert micros_for(plan, "m", D(15)) == 7_497_500
    # $25 is past what the first tier ever costs ($20): 24.995 units, in the second
    assert micros_for(plan, "m", D(25)) == 24_995_000
