"""Rate limits scoped per API key, end user and endpoint, combined, over HTTP against
real Redis and PostgreSQL: each scope counts on its own, a limit per end user needs the
end user named, leases decline it, and the limits API reads the state of a scope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from tally_sdk import Ask, LeaseDecider, Tally

from schemas.plans import RateLimit
from services.api import service as api_service
from services.common.settings import Settings
from services.runtime import Runtime, http_app
from tests.accounts_support import customer_on, plan_with, running_api
from tests.http_support import serving


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings) as client:
        yield client


def _scoped(*limits: dict[str, Any]) -> dict[str, Any]:
    return plan_with(rate_limits=list(limits))


async def _statuses(
    api: httpx.AsyncClient, auth: dict[str, str], calls: int, **body: Any
) -> list[int]:
    return [
        (await api.post("/v1/enforce", json=body, headers=auth)).status_code for _ in range(calls)
    ]


async def _second_key(api: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, str]:
    reply = await api.post("/v1/keys", json={"scopes": ["enforce"]}, headers=auth)
    assert reply.status_code == 201, reply.text
    return {"Authorization": f"Bearer {reply.json()['key']}"}


async def test_a_limit_per_key_counts_each_key_and_the_customer_limit_all(
    api: httpx.AsyncClient,
) -> None:
    plan = _scoped(
        {"name": "per-key", "limit": 3, "per": "minute", "scope": ["key"]},
        {"name": "whole", "limit": 5, "per": "minute"},
    )
    _, first = await customer_on(api, plan)
    second = await _second_key(api, first)
    assert await _statuses(api, first, 4) == [200, 200, 200, 429]
    refused = await api.post("/v1/enforce", json={}, headers=first)
    assert refused.json()["policy"] == "per-key"
    assert await _statuses(api, second, 3) == [200, 200, 429]  # 5 for the customer in all
    assert (await api.post("/v1/enforce", json={}, headers=second)).json()["policy"] == "whole"


async def test_a_limit_per_end_user_and_endpoint(api: httpx.AsyncClient) -> None:
    plan = _scoped(
        {"name": "per-user-route", "limit": 2, "per": "minute", "scope": ["end_user", "endpoint"]}
    )
    customer, auth = await customer_on(api, plan)
    ann = {"end_user": "203.0.113.7", "endpoint": "/search"}
    assert await _statuses(api, auth, 3, **ann) == [200, 200, 429]
    assert await _statuses(api, auth, 2, **(ann | {"endpoint": "/geo"})) == [200, 200]
    assert await _statuses(api, auth, 2, **(ann | {"end_user": "bob"})) == [200, 200]
    refusal = await api.post("/v1/enforce", json=ann, headers=auth)
    assert refusal.headers["RateLimit"].startswith('"per-user-route";r=0;')

    unnamed = await api.post("/v1/enforce", json={"endpoint": "/search"}, headers=auth)
    assert unnamed.status_code == 422, unnamed.text
    assert unnamed.json()["errors"][0]["field"] == "body.end_user"
    assert "per-user-route" in unnamed.json()["detail"]
    bad = await api.post("/v1/enforce", json={"end_user": "a\u0000b"}, headers=auth)
    assert bad.status_code == 422

    limits = await api.get(
        f"/v1/customers/{customer}/limits",
        params={"end_user": "203.0.113.7", "endpoint": "/search"},
        headers=auth,
    )
    assert limits.status_code == 200, limits.text
    [state] = limits.json()["limits"]
    assert state["scope"] == ["end_user", "endpoint"] and state["remaining"] == 0


async def test_leases_decline_a_limit_per_end_user(api: httpx.AsyncClient) -> None:
    plan = _scoped({"name": "per-user", "limit": 2, "per": "minute", "scope": ["end_user"]})
    _, auth = await customer_on(api, plan)
    declined = await api.post("/v1/leases", json={"want": 5}, headers=auth)
    assert declined.status_code == 409, declined.text
    assert declined.json()["type"].endswith("/lease-declined")
    keyed = _scoped({"name": "per-key", "limit": 4, "per": "minute", "scope": ["key"]})
    _, key_auth = await customer_on(api, keyed)
    lease = await api.post("/v1/leases", json={"want": 10}, headers=key_auth)
    assert lease.status_code == 200 and lease.json()["granted"] <= 4
    spent = lease.json()["granted"]
    after = await _statuses(api, key_auth, 5 - spent)
    assert after.count(200) == 4 - spent  # the lease took the key's tokens


def test_a_scope_named_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="at most once"):
        RateLimit.model_validate(
            {"name": "x", "limit": 1, "per": "minute", "scope": ["key", "key"]}
        )
    with pytest.raises(ValidationError):
        RateLimit.model_validate({"name": "x", "limit": 1, "per": "minute", "scope": ["ip"]})


async def test_the_sdk_decides_limits_per_end_user_call_by_call(settings: Settings) -> None:
    """A lease is declined for a plan that limits each end user; the SDK's lease decider
    then asks /v1/enforce for every call, naming its end user, for a while."""
    settings = settings.model_copy(update={"admin_token": "test-admin-token"})
    async with Runtime(settings) as runtime:
        app = http_app([await api_service.start(runtime)])
        async with serving(app) as url:
            async with httpx.AsyncClient(base_url=url) as admin:
                plan = _scoped(
                    {"name": "per-user", "limit": 2, "per": "minute", "scope": ["end_user"]}
                )
                _, auth = await customer_on(admin, plan)
            key = auth["Authorization"].removeprefix("Bearer ")
            async with Tally(url, settings.service_tokens[0]) as tally:
                decider = LeaseDecider(tally)
                asks = [
                    Ask(key, "api_calls", "/e", f"ev-{who}-{n}", "reserve", None, who)
                    for who in ("ann", "bob")
                    for n in range(3)
                ]
                decisions = [await decider.decide(ask) for ask in asks]
                await decider.aclose()
    assert [d.allowed for d in decisions] == [True, True, False] * 2
    assert decisions[2].status == 429 and decisions[2].lease is None
