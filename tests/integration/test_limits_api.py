"""``GET /v1/customers/{c}/limits`` over real Redis and PostgreSQL: the numbers
enforcement uses, read without spending a token or recording anything."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.catalog import Meter
from schemas.events import utcnow
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.accounts_support import (
    ADMIN,
    customer_on,
    enforce,
    plan_with,
    running_api,
    sign_up,
)
from tests.integration.test_usage_api import aggregate, call

SERVICE = {"Authorization": "Bearer test-token"}
REFUSED_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings) as client:
        yield client


async def limits(
    api: httpx.AsyncClient, customer: str, headers: dict[str, str] = SERVICE
) -> dict[str, Any]:
    reply = await api.get(f"/v1/customers/{customer}/limits", headers=headers)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def policy(body: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(lim for lim in body["limits"] if lim["policy"] == name)
    return found


async def snapshot(redis: Redis, customer: str) -> dict[bytes, bytes | None]:
    """Every Redis key of the customer, serialized: what any write would change.  (One
    large SCAN page: the shared test database holds every earlier test's keys, and the
    test's token bucket refills while a slow scan runs.)"""
    pattern = f"tally:{{{customer}}}:*"
    keys = [key async for key in redis.scan_iter(match=pattern, count=100_000)]
    return {key: await redis.dump(key) for key in sorted(keys)}


async def test_used_held_and_remaining_after_calls_then_settled(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    ch: ClickHouse,
    meters: dict[str, list[Meter]],
) -> None:
    """After N reservations: the rate limit has N used, the quota N held; once the
    pipeline counts the events, the quota has N used and none held."""
    plan = plan_with(quota=1000)
    plan["rate_limits"] = [{"name": "per-hour", "limit": 100, "per": "hour"}]
    customer, key = await customer_on(api, plan)
    for i in range(7):
        body = {"mode": "reserve", "event": {"source": "src", "id": f"e{i}"}}
        assert (await api.post("/v1/enforce", json=body, headers=key)).status_code == 200
    before = await limits(api, customer)
    assert before["customer"] == customer and before["plan"] == plan["id"]
    assert before["account_status"] == "active"
    rate, quota = before["limits"]
    assert rate == rate | {"policy": "per-hour", "kind": "rate", "algorithm": "token_bucket"}
    assert (rate["limit"], rate["used"], rate["held"], rate["remaining"]) == (100, 7, 0, 93)
    assert rate["window"] == 3600 and rate["burst"] == 100 and rate["endpoint"] is None
    assert quota == quota | {"policy": "quota:api_calls", "kind": "quota", "meter": "api_calls"}
    assert (quota["limit"], quota["used"], quota["held"], quota["remaining"]) == (1000, 0, 7, 993)
    assert quota["hard"] is True

    events = [call(customer, "api_call", f"e{i}", utcnow()) for i in range(7)]
    await aggregate(settings, ch, redis, meters, events)
    after = policy(await limits(api, customer), "quota:api_calls")
    assert (after["used"], after["held"], after["remaining"]) == (7, 0, 993)


async def test_reading_spends_nothing_and_records_nothing(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    """10 a minute, 9 calls made, 20 reads: the 10th call is still admitted, the 11th
    refused, and not a byte of the customer's Redis state changed while reading."""
    account = await sign_up(api, "free")
    for _ in range(9):
        assert (await enforce(api, account)).status_code == 200
    state = await snapshot(redis, account.customer)
    reads = [await limits(api, account.customer, account.auth) for _ in range(20)]
    assert await snapshot(redis, account.customer) == state
    for body in reads:
        rate = policy(body, "free-per-minute")
        assert (rate["limit"], rate["used"], rate["remaining"]) == (10, 9, 1)
    assert (await enforce(api, account)).status_code == 200
    refused = await enforce(api, account)
    assert refused.status_code == 429 and refused.json()["policy"] == "free-per-minute"
    rate = policy(await limits(api, account.customer, account.auth), "free-per-minute")
    assert (rate["used"], rate["remaining"]) == (10, 0)


async def test_reset_and_window_are_told_in_seconds_and_rfc_3339(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "free")
    decided = (await enforce(api, account)).json()
    body = await limits(api, account.customer, account.auth)
    as_of = datetime.fromisoformat(body["as_of"])
    assert as_of.utcoffset() == timedelta(0) and abs(as_of - utcnow()) < timedelta(seconds=5)
    rate, quota = policy(body, "free-per-minute"), policy(body, "quota:api_calls")
    assert rate["reset"] == 6 and rate["window"] == 60  # one token back per 6 s
    reset_at = datetime.fromisoformat(rate["reset_at"])
    assert timedelta(seconds=5) < reset_at - as_of <= timedelta(seconds=6)
    period_end = datetime.fromisoformat(quota["reset_at"])
    assert (period_end.day, period_end.hour, period_end.minute) == (1, 0, 0)
    assert quota["reset"] == pytest.approx((period_end - as_of).total_seconds(), abs=1)
    enforced = next(lim for lim in decided["limits"] if lim["kind"] == "quota")
    assert quota["window"] == enforced["window"]  # the billing period, as enforcement has it


async def test_fractional_reservations_are_held(api: httpx.AsyncClient) -> None:
    customer, key = await customer_on(api, plan_with(quota=10))
    for i in range(3):
        body = {"mode": "reserve", "quantity": "1.25", "event": {"source": "s", "id": f"f{i}"}}
        assert (await api.post("/v1/enforce", json=body, headers=key)).status_code == 200
    quota = policy(await limits(api, customer, key), "quota:api_calls")
    assert (quota["held"], quota["remaining"], quota["used"]) == ("3.75", "6.25", 0)


async def test_endpoint_limits_and_costs(api: httpx.AsyncClient) -> None:
    plan = plan_with(per_minute=10, endpoint_costs={"/v1/recognize": 4})
    plan["rate_limits"].append(
        {"name": "recognize", "limit": 8, "per": "hour", "endpoint": "/v1/recognize"}
    )
    customer, key = await customer_on(api, plan)
    reply = await api.post("/v1/enforce", json={"endpoint": "/v1/recognize"}, headers=key)
    assert reply.status_code == 200
    body = await limits(api, customer, key)
    assert body["endpoint_costs"] == {"/v1/recognize": 4}
    assert [lim["policy"] for lim in body["limits"]] == ["per-minute", "recognize"]
    minute, recognize = body["limits"]
    assert (minute["endpoint"], minute["used"], minute["remaining"]) == (None, 4, 6)
    assert (recognize["endpoint"], recognize["used"], recognize["remaining"]) == (
        "/v1/recognize",
        4,
        4,
    )


async def test_who_may_read(api: httpx.AsyncClient) -> None:
    account, other = await sign_up(api, "pro"), await sign_up(api, "pro")
    path = f"/v1/customers/{account.customer}/limits"

    async def problem(reply: httpx.Response, status: int, slug: str) -> dict[str, Any]:
        assert reply.status_code == status, reply.text
        assert reply.headers["content-type"] == "application/problem+json"
        body: dict[str, Any] = reply.json()
        assert body["type"] == f"https://tally.dev/problems/{slug}"
        return body

    await problem(await api.get(path), 401, "unauthorized")
    await problem(await api.get(path, headers=other.auth), 403, "forbidden")
    enforcer = await api.post("/v1/keys", json={"scopes": ["enforce"]}, headers=account.auth)
    no_read = {"Authorization": f"Bearer {enforcer.json()['key']}"}
    scope = await problem(await api.get(path, headers=no_read), 403, "insufficient-scope")
    assert scope["scope"] == "usage:read"
    reader = await api.post("/v1/keys", json={"scopes": ["usage:read"]}, headers=account.auth)
    read_only = {"Authorization": f"Bearer {reader.json()['key']}"}
    assert (await limits(api, account.customer, read_only))["plan"] == "pro"
    assert (await limits(api, account.customer, SERVICE))["account_status"] == "trial"
    unknown = await problem(
        await api.get("/v1/customers/nobody-here/limits", headers=SERVICE), 404, "unknown-customer"
    )
    assert "nobody-here" in unknown["detail"]
    bad = await problem(
        await api.get("/v1/customers/NOT%20an%20id/limits", headers=SERVICE),
        422,
        "invalid-request",
    )
    assert bad["errors"][0]["field"] == "path.customer"


async def test_a_customer_never_projected_is_projected_first(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    account = await sign_up(api, "free")
    await redis.delete(redis_keys.account(account.customer), redis_keys.api_keys(account.customer))
    body = await limits(api, account.customer, account.auth)
    assert body["plan"] == "free" and body["account_status"] == "active"
    assert (policy(body, "free-per-minute")["remaining"], len(body["limits"])) == (10, 2)
    assert await redis.hget(redis_keys.account(account.customer), "plan") == b"free"


async def test_a_trial_that_ran_out_is_told_on_the_plan_it_moves_to(
    api: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    """The next decision would end the trial and count free's limits: so does the read."""
    account = await sign_up(api, "starter")
    assert (await limits(api, account.customer))["account_status"] == "trial"
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE customers SET trial_ends_at = %s WHERE id = %s",
            (utcnow() - timedelta(seconds=1), account.customer),
        )
    await api.patch(f"/v1/admin/customers/{account.customer}", json={}, headers=ADMIN)
    body = await limits(api, account.customer, account.auth)
    assert (body["plan"], body["account_status"]) == ("free", "active")
    assert [lim["policy"] for lim in body["limits"]] == ["free-per-minute", "quota:api_calls"]
    decided = await enforce(api, account)
    assert (decided.json()["plan"], decided.json()["account_status"]) == ("free", "active")


async def test_redis_down_is_a_503_problem(settings: Settings) -> None:
    async with running_api(settings) as api:
        account = await sign_up(api, "free")
    async with running_api(settings, redis_url=REFUSED_REDIS) as api:
        for headers in (SERVICE, account.auth):
            reply = await api.get(f"/v1/customers/{account.customer}/limits", headers=headers)
            assert reply.status_code == 503, reply.text
            assert reply.headers["content-type"] == "application/problem+json"
            assert int(reply.headers["Retry-After"]) > 0
            body = reply.json()
            assert body["type"].endswith("/store-unavailable") and body["store"] == "redis"


async def test_a_refusal_tells_what_remains_as_limits_does(api: httpx.AsyncClient) -> None:
    """A refused call takes nothing: its answer's remaining counts are those of
    ``/limits``, not those of the call admitted (an outside review saw a 429 tell a
    quota remaining one lower than ``/limits``)."""
    plan = plan_with(quota=1000)
    plan["rate_limits"] = [
        {"name": "per-minute", "limit": 3, "per": "minute"},
        {"name": "per-hour", "limit": 100, "per": "hour"},
    ]
    customer, key = await customer_on(api, plan)
    for i in range(4):
        body = {"mode": "reserve", "event": {"source": "src", "id": f"e{i}"}}
        refused = await api.post("/v1/enforce", json=body, headers=key)
        assert refused.status_code == (200 if i < 3 else 429), refused.text
    assert refused.status_code == 429 and refused.json()["policy"] == "per-minute"
    told = {lim["policy"]: lim["remaining"] for lim in refused.json()["limits"]}
    status = await limits(api, customer)
    assert told == {lim["policy"]: lim["remaining"] for lim in status["limits"]}
    assert told == {"per-minute": 0, "per-hour": 97, "quota:api_calls": 997}


async def test_unknown_or_repeated_parameters_and_missing_keys_are_named(
    api: httpx.AsyncClient,
) -> None:
    """A misspelt ``endpoint`` would read the plan-wide state, a repeated one either of
    two; a caller without a valid key learns that first."""
    account = await sign_up(api, "free")
    path = f"/v1/customers/{account.customer}/limits"
    cases = [
        ("endpont=/v1/geocode", "query.endpont", "Extra inputs"),
        ("endpoint=/a&endpoint=/b", "query.endpoint", "more than once"),
        ("endpoint=" + "e" * 257, "query.endpoint", "at most 256"),
    ]
    for query, field, reason in cases:
        reply = await api.get(f"{path}?{query}", headers=account.auth)
        assert reply.status_code == 422, reply.text
        assert reply.headers["content-type"] == "application/problem+json"
        [error] = reply.json()["errors"]
        assert error["field"] == field and reason in error["reason"], error
    for headers in ({}, {"Authorization": "Bearer tally_live_nope"}):
        reply = await api.get(f"{path}?endpont=x", headers=headers)
        assert reply.status_code == 401, reply.text
    # another customer's key learns it may not read this customer, not what the query lacks
    other = await sign_up(api, "free")
    usage = f"/v1/customers/{account.customer}/usage?limit=abc"
    for asked in (f"{path}?endpont=x", usage):
        reply = await api.get(asked, headers=other.auth)
        assert reply.status_code == 403, reply.text
        assert reply.json()["type"].endswith("/forbidden"), reply.text
