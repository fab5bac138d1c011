"""Alert rules over HTTP: the plan's defaults, a customer's own rules, every bad input,
and the compiled levels in Redis following each change."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.alerts import decode
from schemas.events import VALUE_SCALE
from schemas.problem_types import TYPE_BASE
from services.billing.notification import alert_routes
from services.billing.notification.access import Access
from services.billing.notification.alerts.compile import AlertCompiler
from services.common.auth import Authenticator
from services.common.settings import Settings
from services.runtime import Component, http_app
from tests.accounts_support import ADMIN, Account, running_api, sign_up

SERVICE = {"Authorization": "Bearer test-token"}


def alerts_client(settings: Settings, pool: AsyncConnectionPool, redis: Redis) -> httpx.AsyncClient:
    admin = settings.model_copy(update={"admin_token": "test-admin-token"})  # ADMIN's
    access = Access(Authenticator(admin, redis, pool))
    router = alert_routes.router(pool, access, AlertCompiler(pool, redis))
    app = http_app([Component("billing", routers=[router])])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")


async def levels(redis: Redis, customer: str, meter: str = "api_calls") -> list[Decimal]:
    raw: Any = await redis.hget(redis_keys.alerts(customer), meter)
    return [Decimal(t.quantity) / VALUE_SCALE for t in decode(raw.decode())] if raw else []


@pytest.fixture
async def accounts(settings: Settings) -> dict[str, Account]:
    async with running_api(settings) as api:
        return {plan: await sign_up(api, plan=plan) for plan in ("free", "starter", "payg")}


async def test_defaults_rules_and_their_compiled_levels(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, accounts: dict[str, Account]
) -> None:
    free = accounts["free"]
    path = f"/v1/customers/{free.customer}/alerts"
    async with alerts_client(settings, pool, redis) as client:
        listed = (await client.get(path, headers=free.auth)).json()
        assert listed["plan"] == "free"
        [defaults] = listed["alerts"]
        assert (defaults["id"], defaults["meter"], defaults["limit"]) == (
            "plan",
            "api_calls",
            "1000",
        )
        assert [t["quantity"] for t in defaults["thresholds"]] == ["800", "900", "1000"]

        added = await client.post(
            path, json={"meter": "api_calls", "kind": "usage", "thresholds": [500]}, headers=SERVICE
        )
        assert added.status_code == 201, added.text
        rule = added.json()
        assert rule["id"].startswith("alr_") and rule["source"] == "customer"
        assert rule["thresholds"] == [{"value": "500", "quantity": "500"}]
        assert await levels(redis, free.customer) == [500, 800, 900, 1000]

        own = await client.post(
            path,
            json={"meter": "api_calls", "kind": "percent", "thresholds": [50]},
            headers=free.auth,
        )
        assert own.status_code == 201, own.text
        assert own.json()["thresholds"] == [{"value": "50", "quantity": "500"}]
        assert await levels(redis, free.customer) == [500, 800, 900, 1000]  # 500 once

        listed = (await client.get(path, headers=SERVICE)).json()
        assert [a["id"] for a in listed["alerts"]] == ["plan", rule["id"], own.json()["id"]]

        for gone in (rule["id"], own.json()["id"]):
            deleted = await client.delete(f"{path}/{gone}", headers=free.auth)
            assert deleted.status_code == 204, deleted.text
        assert await levels(redis, free.customer) == [800, 900, 1000]
        again = await client.delete(f"{path}/{rule['id']}", headers=free.auth)
        assert again.status_code == 404
        assert again.json()["type"] == TYPE_BASE + "unknown-alert"


async def test_spend_compiles_through_the_plan_price(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, accounts: dict[str, Account]
) -> None:
    starter = accounts["starter"]
    async with alerts_client(settings, pool, redis) as client:
        added = await client.post(
            f"/v1/customers/{starter.customer}/alerts",
            json={"meter": "api_calls", "kind": "spend", "thresholds": ["60.00", "100"]},
            headers=starter.auth,
        )
    assert added.status_code == 201, added.text
    body = added.json()
    assert body["currency"] == "usd"
    # $49 fee; then $0.001 a call beyond 50,000: $11 at 61,000 calls (10,995 round up)
    assert [t["quantity"] for t in body["thresholds"]] == ["60995", "100995"]
    assert 60_995 in await levels(redis, starter.customer)


BAD = [
    ("free", {"meter": "nope", "kind": "usage", "thresholds": [1]}, "body.meter", "unknown meter"),
    (
        "payg",
        {"meter": "api_calls", "kind": "percent", "thresholds": [80]},
        "body.meter",
        "no quota",
    ),
    (
        "free",
        {"meter": "compute_seconds", "kind": "spend", "thresholds": [5]},
        "body.meter",
        "no price",
    ),
    (
        "free",
        {"meter": "api_calls", "kind": "spend", "thresholds": [5]},
        "body.thresholds[0]",
        "no usage",
    ),
    (
        "free",
        {"meter": "api_calls", "kind": "usage", "thresholds": [5, 7, 5]},
        "body.thresholds[2]",
        "twice",
    ),
    (
        "free",
        {"meter": "api_calls", "kind": "percent", "thresholds": [1001]},
        "body.thresholds[0]",
        "at most",
    ),
]


@pytest.mark.parametrize(("plan", "body", "field", "says"), BAD)
async def test_each_bad_rule_names_its_field(
    settings: Settings,
    pool: AsyncConnectionPool,
    redis: Redis,
    accounts: dict[str, Account],
    plan: str,
    body: dict[str, Any],
    field: str,
    says: str,
) -> None:
    customer = accounts[plan].customer
    async with alerts_client(settings, pool, redis) as client:
        reply = await client.post(f"/v1/customers/{customer}/alerts", json=body, headers=SERVICE)
    assert reply.status_code == 422, reply.text
    problem = reply.json()
    assert problem["type"] == TYPE_BASE + "invalid-request"
    [error] = problem["errors"]
    assert error["field"] == field and says in error["reason"], problem


@pytest.mark.parametrize(
    ("thresholds", "field"),
    [([], "thresholds"), (list(range(1, 12)), "thresholds"), ([0], "thresholds[0]"),
     ([-3], "thresholds[0]"), (["x"], "thresholds[0]")],
)  # fmt: skip
async def test_threshold_lists_out_of_bounds(
    settings: Settings,
    pool: AsyncConnectionPool,
    redis: Redis,
    accounts: dict[str, Account],
    thresholds: list[Any],
    field: str,
) -> None:
    customer = accounts["free"].customer
    body = {"meter": "api_calls", "kind": "usage", "thresholds": thresholds}
    async with alerts_client(settings, pool, redis) as client:
        reply = await client.post(f"/v1/customers/{customer}/alerts", json=body, headers=SERVICE)
    assert reply.status_code == 422, reply.text
    assert [e["field"] for e in reply.json()["errors"]] == [f"body.{field}"]


async def test_at_most_ten_rules_a_meter(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, accounts: dict[str, Account]
) -> None:
    customer = accounts["payg"].customer
    path = f"/v1/customers/{customer}/alerts"
    async with alerts_client(settings, pool, redis) as client:
        for n in range(1, 11):
            body = {"meter": "compute_seconds", "kind": "usage", "thresholds": [n]}
            assert (await client.post(path, json=body, headers=SERVICE)).status_code == 201
        body = {"meter": "compute_seconds", "kind": "usage", "thresholds": [11]}
        refused = await client.post(path, json=body, headers=SERVICE)
        other = {"meter": "api_calls", "kind": "usage", "thresholds": [11]}
        assert (await client.post(path, json=other, headers=SERVICE)).status_code == 201
    assert refused.status_code == 422
    [error] = refused.json()["errors"]
    assert error["field"] == "body.meter" and "10 rules already" in error["reason"]
    assert len(await levels(redis, customer, "compute_seconds")) == 10


async def test_who_may_see_and_change_alerts(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, accounts: dict[str, Account]
) -> None:
    mine, theirs = accounts["free"], accounts["starter"]
    body = {"meter": "api_calls", "kind": "usage", "thresholds": [5]}
    async with alerts_client(settings, pool, redis) as client:
        other = await client.get(f"/v1/customers/{theirs.customer}/alerts", headers=mine.auth)
        other_add = await client.post(
            f"/v1/customers/{theirs.customer}/alerts", json=body, headers=mine.auth
        )
        anonymous = await client.get(f"/v1/customers/{mine.customer}/alerts")
        wrong_admin = await client.get(
            f"/v1/customers/{mine.customer}/alerts", headers={"Authorization": "Bearer nope"}
        )
        admin_add = await client.post(
            f"/v1/customers/{theirs.customer}/alerts", json=body, headers=ADMIN
        )
        admin_list = await client.get(f"/v1/customers/{theirs.customer}/alerts", headers=ADMIN)
        unknown = await client.get("/v1/customers/nobody-here/alerts", headers=SERVICE)
        bad_kind = await client.post(
            f"/v1/customers/{mine.customer}/alerts",
            json=body | {"kind": "loud"},
            headers=SERVICE,
        )
    assert (other.status_code, other_add.status_code, anonymous.status_code) == (403, 403, 401)
    assert wrong_admin.status_code == 401
    assert admin_add.status_code == 201, admin_add.text
    assert [a["source"] for a in admin_list.json()["alerts"]] == ["plan", "customer"]
    assert unknown.status_code == 404
    assert unknown.json()["type"] == TYPE_BASE + "unknown-customer"
    assert bad_kind.status_code == 422
    assert [e["field"] for e in bad_kind.json()["errors"]] == ["body.kind"]
