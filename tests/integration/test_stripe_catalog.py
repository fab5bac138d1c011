"""The catalog mirrored in Stripe (products, prices, meters), Checkout and the billing
portal, and Stripe customers for new sign-ups: the real SDK against the fake server."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from typer.testing import CliRunner

from schemas.catalog import Aggregation, Catalog
from schemas.plans import Plan, Price
from services import cli
from services.api.catalog import store as catalog_store
from services.billing.rating.engine import rate
from services.billing.stripe import client as stripe_client
from services.billing.stripe import mirror as stripe_mirror
from services.billing.stripe.prices import mirror
from services.cli import app
from tests.accounts_support import running_api, sign_up
from tests.billing_support import at, stripe_app, subscribe
from tests.fake_stripe import FakeStripe

runner = CliRunner()

AGGREGATIONS = {
    "api_calls": Aggregation.COUNT,
    "compute_seconds": Aggregation.SUM,
    "storage_gb": Aggregation.MAX,
    "active_users": Aggregation.UNIQUE_COUNT,
}
SERVICE = {"Authorization": "Bearer test-token"}
URLS = {"success_url": "https://app.example/paid", "cancel_url": "https://app.example/plans"}


def plan(id: str = "p", **prices: dict[str, Any]) -> Plan:
    return Plan.model_validate({"id": id, "name": id.title(), "price": "10", "prices": prices})


def default_plan(plan_id: str) -> Plan:
    return next(p for p in Catalog.default().plans if p.id == plan_id)


# --- translation ------------------------------------------------------------------------


def test_the_brief_tiers_as_stripe_prices() -> None:
    starter = mirror(default_plan("starter"), AGGREGATIONS)
    fee, calls = starter.prices
    assert fee.params["unit_amount_decimal"] == "4900"
    assert fee.params["recurring"] == {"interval": "month", "usage_type": "licensed"}
    assert calls.params["recurring"] == {"interval": "month", "usage_type": "metered"}
    assert (calls.params["billing_scheme"], calls.params["tiers_mode"]) == ("tiered", "graduated")
    assert calls.params["tiers"] == [
        {"up_to": 50000, "unit_amount_decimal": "0"},
        {"up_to": "inf", "unit_amount_decimal": "0.1"},
    ]
    assert calls.params["lookup_key"] == "tally_starter_api_calls"

    payg = mirror(default_plan("payg"), AGGREGATIONS)
    assert [p.component for p in payg.prices] == ["api_calls", "compute_seconds"]
    assert [t["unit_amount_decimal"] for t in payg.prices[0].params["tiers"]] == [
        "0",
        "0.1",
        "0.05",
        "0.02",
    ]
    assert "max meters are not pushed" in payg.skipped["storage_gb"]


def test_what_stripe_cannot_charge_exactly_is_reported() -> None:
    mirrored = mirror(
        plan(
            api_calls={"model": "per_unit", "unit_price": "0.01", "minimum": "5"},
            compute_seconds={
                "model": "volume",
                "included": "10",
                "tiers": [{"up_to": None, "unit_price": "1"}],
            },
            storage_gb={"model": "per_unit", "unit_price": "1"},
            active_users={"model": "per_unit", "unit_price": "1"},
        ),
        AGGREGATIONS,
    )
    assert [p.component for p in mirrored.prices] == ["fee"]
    assert mirrored.skipped["api_calls"] == "Stripe prices have no minimum charge"
    assert "included ones too" in mirrored.skipped["compute_seconds"]
    assert "unique_count meters" in mirrored.skipped["active_users"]

    fractional = mirror(
        plan(compute_seconds={"model": "per_unit", "included": "0.5", "unit_price": "1"}),
        AGGREGATIONS,
    )
    assert "fractional included units" in fractional.skipped["compute_seconds"]
    unlimited = mirror(
        plan(compute_seconds={"model": "per_unit", "included": "unlimited", "unit_price": "1"}),
        AGGREGATIONS,
    )
    assert unlimited.skipped["compute_seconds"] == "unlimited usage: nothing to charge"


def test_package_pricing_divides_and_rounds_up() -> None:
    [_, package] = mirror(
        plan(api_calls={"model": "package", "package_size": "1000", "unit_price": "2"}),
        AGGREGATIONS,
    ).prices
    assert package.params["transform_quantity"] == {"divide_by": 1000, "round": "up"}
    assert package.params["unit_amount_decimal"] == "200"


def stripe_amount(params: dict[str, Any], quantity: int) -> Decimal:
    """What Stripe charges for ``quantity`` under a price, in minor units, following its
    documented rules (deliberately written apart from Tally's rating)."""
    if params.get("billing_scheme") != "tiered":
        transform = params.get("transform_quantity")
        if transform:
            quantity = math.ceil(quantity / transform["divide_by"])
        return quantity * Decimal(params["unit_amount_decimal"])
    total, below = Decimal(0), 0
    for tier in params["tiers"]:
        top = quantity if tier["up_to"] == "inf" else int(tier["up_to"])
        unit = Decimal(tier["unit_amount_decimal"])
        flat = Decimal(tier.get("flat_amount_decimal", "0"))
        if params["tiers_mode"] == "volume":
            if quantity <= top:
                return quantity * unit + flat
            continue
        if quantity > below:
            total += (min(quantity, top) - below) * unit + flat
        below = top
    return total


prices = st.one_of(
    st.builds(
        lambda included, unit: {"model": "per_unit", "included": included, "unit_price": unit},
        st.integers(0, 500),
        st.decimals("0", "3", places=4),
    ),
    st.builds(
        lambda size, unit: {"model": "package", "package_size": size, "unit_price": unit},
        st.integers(1, 300),
        st.decimals("0", "50", places=2),
    ),
    st.builds(
        lambda mode, included, bounds, units, flats: {
            "model": mode,
            "included": included if mode == "graduated" else 0,
            "tiers": [
                {"up_to": b, "unit_price": u, "flat_price": f}
                for b, u, f in zip([*sorted(set(bounds)), None], units, flats, strict=False)
            ],
        },
        st.sampled_from(["graduated", "volume"]),
        st.integers(0, 200),
        st.lists(st.integers(1, 1000), min_size=0, max_size=3),
        st.lists(st.decimals("0", "2", places=4), min_size=4, max_size=4),
        st.lists(st.decimals("0", "20", places=2), min_size=4, max_size=4),
    ),
)


@examples(max_examples=300, deadline=None)
@given(prices, st.integers(1, 3000))
def test_mirrored_prices_charge_what_tally_charges(price: dict[str, Any], quantity: int) -> None:
    """For any usage, Stripe's arithmetic on the mirrored price equals Tally's rating."""
    tally = plan(api_calls=price)
    [_, mirrored] = mirror(tally, AGGREGATIONS).prices
    expected = rate(Price.model_validate(price), Decimal(quantity)).amount
    assert stripe_amount(mirrored.params, quantity) == expected.scaleb(2)


# --- sync ----------------------------------------------------------------------------------


def creates(fake: FakeStripe) -> int:
    return sum(r.method == "POST" for r in fake.requests)


async def test_sync_mirrors_the_catalog_once_and_follows_edits(pool, fake_stripe) -> None:
    fake = fake_stripe
    report = await stripe_mirror.sync(pool, fake.client())
    assert "product starter" in report.created and "price starter/fee" in report.created
    assert report.not_mirrored["payg/storage_gb"].startswith("max meters")
    async with pool.connection() as conn:
        starter = await stripe_mirror.price_ids(conn, "starter")
    assert fake.prices[starter["api_calls"]]["lookup_key"] == "tally_starter_api_calls"
    meter = fake.prices[starter["api_calls"]]["recurring"]["meter"]
    assert fake.meters[meter]["event_name"] == "tally_api_calls"
    assert {m["event_name"] for m in fake.meters.values()} >= {
        "tally_api_calls",
        "tally_compute_seconds",
    }

    before = creates(fake)
    again = await stripe_mirror.sync(pool, fake.client())
    assert not again.changed and creates(fake) == before  # nothing changed: no Stripe call

    # A price edit: a new price takes the lookup key, the old one is deactivated.
    async with pool.connection() as conn:
        edited = default_plan("starter").model_dump()
        edited["prices"]["api_calls"]["unit_price"] = "0.002"
        await catalog_store.save_plan(conn, Plan.model_validate(edited), "test")
    edit = await stripe_mirror.sync(pool, fake.client())
    assert edit.created == ["price starter/api_calls"]
    async with pool.connection() as conn:
        now = await stripe_mirror.price_ids(conn, "starter")
        await catalog_store.save_plan(conn, default_plan("starter"), "test")  # put it back
    old, new = fake.prices[starter["api_calls"]], fake.prices[now["api_calls"]]
    assert (old["active"], old["lookup_key"]) == (False, None)
    assert (new["active"], new["lookup_key"]) == (True, "tally_starter_api_calls")
    assert new["tiers"][1]["unit_amount_decimal"] == "0.2"
    assert now["fee"] == starter["fee"]  # the fee did not change
    await stripe_mirror.sync(pool, fake.client())


async def test_a_crash_before_the_record_makes_no_duplicate(pool, fake_stripe) -> None:
    fake = fake_stripe
    await stripe_mirror.sync(pool, fake.client())
    count = len(fake.prices)
    async with pool.connection() as conn:  # as if Stripe answered and the write was lost
        await conn.execute("DELETE FROM stripe_objects WHERE kind = 'price' AND key = 'pro/fee'")
    await stripe_mirror.sync(pool, fake.client())
    assert len(fake.prices) == count


async def test_archived_plan_is_deactivated_in_stripe(pool, fake_stripe, tenant) -> None:
    fake = fake_stripe
    gone = plan(tenant, compute_seconds={"model": "per_unit", "unit_price": "0.01"})
    async with pool.connection() as conn:
        await catalog_store.save_plan(conn, gone, "test")
    await stripe_mirror.sync(pool, fake.client())
    async with pool.connection() as conn:
        ids = await stripe_mirror.price_ids(conn, tenant)
        product = await stripe_client.stripe_id(conn, "product", tenant)
        await conn.execute("UPDATE plans SET archived = true WHERE id = %s", (tenant,))
    report = await stripe_mirror.sync(pool, fake.client())
    assert f"product {tenant}" in report.retired
    assert product is not None and fake.products[product]["active"] is False
    assert all(fake.prices[i]["active"] is False for i in ids.values())


# --- checkout and portal -------------------------------------------------------------------


async def test_checkout_subscribes_to_the_mirrored_prices(
    settings, pool, redis, fake_stripe, tenant
) -> None:
    fake = fake_stripe
    customer = f"{tenant}-up"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    async with stripe_app(settings, pool, redis, fake.client()) as client:
        reply = await client.post(
            f"/v1/customers/{customer}/billing/checkout",
            json={"plan": "pro", **URLS},
            headers=SERVICE,
        )
    assert reply.status_code == 201, reply.text
    session = fake.checkout_sessions[reply.json()["id"]]
    assert reply.json()["url"] == session["url"]
    assert (session["client_reference_id"], session["metadata"]["plan"]) == (customer, "pro")
    async with pool.connection() as conn:
        prices = await stripe_mirror.price_ids(conn, "pro")
        stripe_customer = await stripe_client.stripe_id(conn, "customer", customer)
    assert session["customer"] == stripe_customer
    assert sorted(session["line_items_sent"], key=lambda i: i["price"]) == sorted(
        [{"price": prices["fee"], "quantity": "1"}, {"price": prices["api_calls"]}],
        key=lambda i: i["price"],
    )
    [sent] = [r.params for r in fake.requests_to("/v1/checkout/sessions", "POST")][-1:]
    anchor = int(sent["subscription_data"]["billing_cycle_anchor"])
    first = datetime.fromtimestamp(anchor, UTC)
    assert (first.day, first.hour, first.minute) == (1, 0, 0)  # a calendar plan
    assert sent["subscription_data"]["metadata"]["plan"] == "pro"


async def test_checkout_and_portal_bad_requests(settings, pool, redis, fake_stripe) -> None:
    fake = fake_stripe
    async with running_api(settings) as api:
        mine, theirs = await sign_up(api, "free"), await sign_up(api, "free")
        narrow = await api.post("/v1/keys", json={"scopes": ["usage:read"]}, headers=mine.auth)
        assert narrow.status_code == 201
    checkout = f"/v1/customers/{mine.customer}/billing/checkout"
    portal = f"/v1/customers/{mine.customer}/billing/portal"
    async with stripe_app(settings, pool, redis, fake.client()) as client:

        async def post(path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
            return await client.post(path, json=body, headers=headers)

        ok = await post(checkout, {"plan": "starter", **URLS}, mine.auth)
        assert ok.status_code == 201  # the customer's own key, with the billing scope
        other = await post(checkout, {"plan": "starter", **URLS}, theirs.auth)
        assert other.status_code == 403
        scoped = {"Authorization": f"Bearer {narrow.json()['key']}"}
        assert (await post(checkout, {"plan": "starter", **URLS}, scoped)).status_code == 403
        assert (await post(checkout, {"plan": "starter", **URLS}, {})).status_code == 401

        unknown = await post(checkout, {"plan": "platinum", **URLS}, SERVICE)
        assert unknown.status_code == 422 and "platinum" in unknown.json()["detail"]
        free = await post(checkout, {"plan": "free", **URLS}, SERVICE)
        assert free.status_code == 422 and "is free" in free.json()["detail"]
        bad_url = await post(checkout, {"plan": "pro", "success_url": "nope"}, SERVICE)
        assert bad_url.status_code == 422
        fields = {e["field"] for e in bad_url.json()["errors"]}
        assert fields == {"body.success_url", "body.cancel_url"}
        nobody = await post(
            "/v1/customers/nobody-here/billing/checkout", {"plan": "pro", **URLS}, SERVICE
        )
        assert nobody.status_code == 404

        fake.fail_next("/v1/checkout/sessions", 500)
        failed = await post(checkout, {"plan": "pro", **URLS}, SERVICE)
        assert failed.status_code == 502 and failed.json()["type"].endswith("stripe-error")

        opened = await post(portal, {"return_url": "https://app.example/account"}, mine.auth)
        assert opened.status_code == 201, opened.text
        session = fake.portal_sessions[opened.json()["id"]]
        assert session["return_url"] == "https://app.example/account"
        assert (await post(portal, {}, SERVICE)).status_code == 422

    async with stripe_app(settings, pool, redis, None) as client:
        off = await client.post(portal, json={"return_url": "https://a.example/"}, headers=SERVICE)
        assert off.status_code == 503 and off.json()["type"].endswith("stripe-not-configured")


async def test_already_on_the_plan_is_a_conflict(
    settings, pool, redis, fake_stripe, tenant
) -> None:
    customer = f"{tenant}-pro"
    await subscribe(pool, customer, "pro", at("2026-01-01"))
    async with stripe_app(settings, pool, redis, fake_stripe.client()) as client:
        reply = await client.post(
            f"/v1/customers/{customer}/billing/checkout",
            json={"plan": "pro", **URLS},
            headers=SERVICE,
        )
    assert reply.status_code == 409


async def test_new_sign_ups_become_stripe_customers(pool, fake_stripe, tenant) -> None:
    fake = fake_stripe
    await subscribe(pool, f"{tenant}-new", "free", at("2026-01-01"))
    while await stripe_client.ensure_new_customers(pool, fake.client()):
        pass  # every customer in the shared test database, a batch at a time
    async with pool.connection() as conn:
        found = await stripe_client.stripe_id(conn, "customer", f"{tenant}-new")
    assert found is not None
    assert fake.customers[found]["metadata"] == {"tally_customer": f"{tenant}-new"}
    assert await stripe_client.ensure_new_customers(pool, fake.client()) == 0


def test_stripe_sync_command(settings, fake_stripe, monkeypatch) -> None:
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    result = runner.invoke(app, ["stripe", "sync"])
    assert result.exit_code == 2 and "STRIPE_API_KEY" in result.output
    configured = settings.model_copy(
        update={"stripe_api_key": "sk_test_fake", "stripe_api_base": fake_stripe.api_base}
    )
    monkeypatch.setattr(cli, "get_settings", lambda: configured)
    result = runner.invoke(app, ["stripe", "sync"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.output)
    assert set(report) == {"created", "updated", "retired", "not_mirrored"}
    assert report["not_mirrored"]["payg/storage_gb"].startswith("max meters")
