"""A plan as Stripe products and prices: what can be mirrored exactly, and what cannot.

Pure translation, no I/O.  A plan becomes one product; its recurring fee a licensed
price; each usage price a metered price on the Billing Meter Tally pushes that meter to.
Amounts go as ``unit_amount_decimal`` in the minor unit, unrounded, so $0.0005 a call
is 0.05 cents and Stripe rounds the line as Tally does.

Only what Stripe would charge to the cent the same way Tally's invoice does is
mirrored.  Included units become a free first graduated tier; a package becomes
``transform_quantity`` (divide, round up).  The rest is reported, with the reason, and
billed by Tally's own invoice only:

- meters Tally does not push (max, latest, unique_count): Stripe has no such meter;
- a ``minimum`` charge: Stripe prices have none;
- ``included`` units with volume or package pricing: Stripe applies volume tiers and
  packages to the whole quantity;
- fractional bounds, included units or package sizes: Stripe counts whole units;
- ``included: unlimited``: there is nothing to charge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from schemas.catalog import ADDITIVE, Aggregation
from schemas.plans import Plan, Price, PriceModel, Tier
from services.billing.rating.money import minor_decimal

FEE = "fee"


@dataclass(frozen=True, slots=True)
class PriceSpec:
    """One Stripe price to create: ``params`` lack only the product and meter ids."""

    component: str  # FEE, or the meter priced
    params: dict[str, Any]

    @property
    def meter(self) -> str | None:
        return None if self.component == FEE else self.component


@dataclass(frozen=True, slots=True)
class PlanMirror:
    plan: str
    product: dict[str, Any]
    prices: tuple[PriceSpec, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # component -> why not


class NotMirrored(ValueError):
    """A usage price Stripe cannot charge exactly as Tally does."""


def mirror(plan: Plan, aggregations: Mapping[str, Aggregation]) -> PlanMirror:
    """The Stripe product and prices for ``plan``; ``aggregations`` maps meter names."""
    prices: list[PriceSpec] = []
    skipped: dict[str, str] = {}
    if plan.price > 0:
        prices.append(PriceSpec(FEE, _fee(plan)))
    for meter, price in sorted(plan.prices.items()):
        try:
            prices.append(PriceSpec(meter, _metered(plan, meter, price, aggregations[meter])))
        except NotMirrored as exc:
            skipped[meter] = str(exc)
    product: dict[str, Any] = {"name": plan.name, "metadata": {"tally_plan": plan.id}}
    if plan.description:
        product["description"] = plan.description
    return PlanMirror(plan.id, product, tuple(prices), skipped)


def charges(plan: Plan) -> bool:
    """Whether the plan ever costs anything: a plan that does not needs no checkout."""
    amounts = [plan.price]
    for price in plan.prices.values():
        amounts += [price.unit_price or Decimal(0), price.minimum]
        amounts += [amount for tier in price.tiers for amount in (tier.unit_price, tier.flat_price)]
    return any(amounts)


def lookup_key(plan: str, component: str) -> str:
    """Stable across price versions: the newest price of a component holds it."""
    return f"tally_{plan}_{component}"


def _common(plan: Plan, component: str) -> dict[str, Any]:
    return {
        "currency": plan.currency,
        "lookup_key": lookup_key(plan.id, component),
        "transfer_lookup_key": True,
        "nickname": f"{plan.name}: {component}",
        "metadata": {"tally_plan": plan.id, "tally_component": component},
    }


def _fee(plan: Plan) -> dict[str, Any]:
    return _common(plan, FEE) | {
        "unit_amount_decimal": minor_decimal(plan.price, plan.currency),
        "recurring": {"interval": plan.interval.value, "usage_type": "licensed"},
    }


def _metered(plan: Plan, meter: str, price: Price, aggregation: Aggregation) -> dict[str, Any]:
    if aggregation not in ADDITIVE:
        raise NotMirrored(f"{aggregation} meters are not pushed to Stripe (only count and sum are)")
    if not isinstance(price.included, Decimal):
        raise NotMirrored("unlimited usage: nothing to charge")
    if price.minimum:
        raise NotMirrored("Stripe prices have no minimum charge")
    recurring = {"interval": plan.interval.value, "usage_type": "metered"}
    params = _common(plan, meter) | {"recurring": recurring}
    return params | _pricing(price, price.included, plan.currency)


def _pricing(price: Price, included: Decimal, currency: str) -> dict[str, Any]:
    """The billing scheme, amounts and tiers of one usage price."""
    _whole(included, "included units")
    match price.model:
        case PriceModel.PER_UNIT if not included:
            assert price.unit_price is not None
            return {"unit_amount_decimal": minor_decimal(price.unit_price, currency)}
        case PriceModel.PER_UNIT:
            assert price.unit_price is not None
            return _tiered("graduated", (Tier(unit_price=price.unit_price),), included, currency)
        case PriceModel.GRADUATED:
            return _tiered("graduated", price.tiers, included, currency)
        case PriceModel.VOLUME if not included:
            return _tiered("volume", price.tiers, included, currency)
        case PriceModel.PACKAGE if not included:
            assert price.unit_price is not None and price.package_size is not None
            return {
                "unit_amount_decimal": minor_decimal(price.unit_price, currency),
                "transform_quantity": {
                    "divide_by": _whole(price.package_size, "package size"),
                    "round": "up",
                },
            }
    raise NotMirrored(f"Stripe applies {price.model} pricing to all units, included ones too")


def _tiered(mode: str, tiers: tuple[Tier, ...], included: Decimal, currency: str) -> dict[str, Any]:
    """Tiers over the whole quantity: Tally's bounds count billable units, after the
    included ones, so each bound moves up by ``included`` behind a free first tier."""
    shifted: list[dict[str, Any]] = []
    if included:
        shifted.append({"up_to": _whole(included, "included units"), "unit_amount_decimal": "0"})
    for tier in tiers:
        bound = "inf" if tier.up_to is None else _whole(tier.up_to + included, "tier bounds")
        row: dict[str, Any] = {
            "up_to": bound,
            "unit_amount_decimal": minor_decimal(tier.unit_price, currency),
        }
        if tier.flat_price:
            row["flat_amount_decimal"] = minor_decimal(tier.flat_price, currency)
        shifted.append(row)
    return {"billing_scheme": "tiered", "tiers_mode": mode, "tiers": shifted}


def _whole(amount: Decimal, what: str) -> int:
    if amount != amount.to_integral_value():
        raise NotMirrored(f"fractional {what} ({amount}): Stripe counts whole units")
    return int(amount)
