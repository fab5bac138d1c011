"""Keeping Stripe's products, prices and meters in step with Tally's catalog.

``sync`` is safe to run as often as one likes (the billing service runs it on every
Stripe pass, ``tally stripe sync`` on demand): each object Tally made is recorded in
``stripe_objects`` with a digest of what it was made from, so an unchanged plan costs
no Stripe call at all.

- A product per plan (``tally_plan`` metadata); a changed name or description updates it.
- A price per plan component (fee, or meter).  Stripe prices cannot change their
  amounts, so a changed component gets a new price that takes over the lookup key
  ``tally_{plan}_{component}``, and the old one is deactivated: subscriptions on it
  keep it until they move.
- A plan archived, or a component dropped: its prices (and product) are deactivated.

Every create carries an idempotency key made of Tally's ids and the digest (and the
price it replaces), so a crash between Stripe's answer and the record being written
gets the same object back on the next pass rather than a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import stripe
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import ADDITIVE, Aggregation
from schemas.plans import Plan
from services.billing.stripe import client as stripe_client
from services.billing.stripe.client import call, digest, recorded, remember
from services.billing.stripe.prices import PlanMirror, PriceSpec, mirror
from services.common import catalog

RETIRED = "retired"  # the digest of a deactivated object


@dataclass(slots=True)
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    not_mirrored: dict[str, str] = field(default_factory=dict)  # "plan/meter" -> why

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.retired)


async def sync(pool: AsyncConnectionPool, api: stripe.StripeClient) -> SyncReport:
    """Bring Stripe's meters, products and prices in line with the catalog."""
    report = SyncReport()
    async with pool.connection() as conn:
        meters = await _meters(conn, api)
        plans = await catalog.read_plans(conn)
        for plan in plans:
            await _sync_plan(conn, api, plan, meters, report)
        await _retire_plans(conn, api, {p.id for p in plans}, report)
    return report


async def sync_plan(conn: AsyncConnection, api: stripe.StripeClient, plan: Plan) -> dict[str, str]:
    """Mirror one plan now; its live price ids by component."""
    await _sync_plan(conn, api, plan, await _meters(conn, api), SyncReport())
    return await price_ids(conn, plan.id)


async def price_ids(conn: AsyncConnection, plan: str) -> dict[str, str]:
    """The live Stripe price of each mirrored component of ``plan``."""
    cur = await conn.execute(
        "SELECT key, stripe_id FROM stripe_objects"
        " WHERE kind = 'price' AND key LIKE %s AND digest <> %s",
        (f"{plan}/%", RETIRED),
    )
    return {str(key).split("/", 1)[1]: str(found) for key, found in await cur.fetchall()}


@dataclass(frozen=True, slots=True)
class _Meters:
    aggregations: dict[str, Aggregation]
    stripe_ids: dict[str, str]  # of the meters Tally pushes


async def _meters(conn: AsyncConnection, api: stripe.StripeClient) -> _Meters:
    meters = await catalog.meters(conn)
    stripe_ids = {
        m.name: await stripe_client.ensure_meter(conn, api, m.name)
        for m in meters
        if m.aggregation in ADDITIVE
    }
    await conn.commit()
    return _Meters({m.name: m.aggregation for m in meters}, stripe_ids)


async def _sync_plan(
    conn: AsyncConnection, api: stripe.StripeClient, plan: Plan, meters: _Meters, report: SyncReport
) -> None:
    wanted = mirror(plan, meters.aggregations)
    product = await _sync_product(conn, api, wanted, report)
    for spec in wanted.prices:
        params = _params(spec, product, meters.stripe_ids)
        await _sync_price(conn, api, wanted.plan, params, spec, report)
    live = await price_ids(conn, wanted.plan)
    for component in live.keys() - {spec.component for spec in wanted.prices}:
        await _retire(conn, api, "price", f"{wanted.plan}/{component}", report)
    report.not_mirrored |= {f"{wanted.plan}/{m}": why for m, why in wanted.skipped.items()}


def _params(spec: PriceSpec, product: str, meter_ids: Mapping[str, str]) -> dict[str, Any]:
    params = spec.params | {"product": product}
    if spec.meter is not None:
        params["recurring"] = params["recurring"] | {"meter": meter_ids[spec.meter]}
    return params


async def _sync_product(
    conn: AsyncConnection, api: stripe.StripeClient, wanted: PlanMirror, report: SyncReport
) -> str:
    fingerprint = digest(wanted.product)
    known = await recorded(conn, "product", wanted.plan)
    if known is not None and known.digest == fingerprint:
        return known.stripe_id
    if known is None:
        made = await call(
            api.v1.products.create,
            wanted.product,
            idempotency_key=f"tally-product-{wanted.plan}",
        )
        report.created.append(f"product {wanted.plan}")
    else:  # renamed, or back from retirement
        made = await call(
            api.v1.products.update, known.stripe_id, wanted.product | {"active": True}
        )
        report.updated.append(f"product {wanted.plan}")
    await remember(conn, "product", wanted.plan, made.id, fingerprint)
    await conn.commit()
    return str(made.id)


async def _sync_price(
    conn: AsyncConnection,
    api: stripe.StripeClient,
    plan: str,
    params: dict[str, Any],
    spec: PriceSpec,
    report: SyncReport,
) -> None:
    key = f"{plan}/{spec.component}"
    fingerprint = digest(params)
    known = await recorded(conn, "price", key)
    if known is not None and known.digest == fingerprint:
        return
    replaces = known.stripe_id if known else "none"
    made = await call(
        api.v1.prices.create,
        params,
        idempotency_key=f"tally-price-{key}-{fingerprint}-after-{replaces}",
    )
    report.created.append(f"price {key}")
    if known is not None and known.digest != RETIRED:
        await _deactivate(api, "price", known.stripe_id)
    await remember(conn, "price", key, made.id, fingerprint)
    await conn.commit()


async def _retire_plans(
    conn: AsyncConnection, api: stripe.StripeClient, plans: set[str], report: SyncReport
) -> None:
    cur = await conn.execute(
        "SELECT key FROM stripe_objects WHERE kind = 'product' AND digest <> %s", (RETIRED,)
    )
    for (plan,) in await cur.fetchall():
        if plan in plans:
            continue
        for component in await price_ids(conn, plan):
            await _retire(conn, api, "price", f"{plan}/{component}", report)
        await _retire(conn, api, "product", plan, report)


async def _retire(
    conn: AsyncConnection, api: stripe.StripeClient, kind: str, key: str, report: SyncReport
) -> None:
    known = await recorded(conn, kind, key)
    assert known is not None
    await _deactivate(api, kind, known.stripe_id)
    await remember(conn, kind, key, known.stripe_id, RETIRED)
    await conn.commit()
    report.retired.append(f"{kind} {key}")


async def _deactivate(api: stripe.StripeClient, kind: str, stripe_id: str) -> None:
    service = api.v1.prices if kind == "price" else api.v1.products
    await call(service.update, stripe_id, {"active": False})
