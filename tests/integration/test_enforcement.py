"""Enforcement over HTTP against real Redis and PostgreSQL: the brief's scenarios."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.catalog import Meter
from schemas.events import VALUE_SCALE, utcnow
from schemas.windows import Window, bucket_id
from services.api.accounts import store as accounts
from services.api.accounts.projection_lock import lock_projection
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.accounts_support import (
    ADMIN,
    Account,
    customer_on,
    enforce,
    plan_with,
    put_plan,
    running_api,
    sign_up,
)
from tests.integration.test_usage_api import aggregate, call


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings) as client:
        yield client


async def set_usage(redis: Redis, customer: str, calls: int) -> None:
    """Usage as the aggregator leaves it: this month's api_calls counter."""
    key = redis_keys.counters(
        customer, "api_calls", Window.MONTH, bucket_id(Window.MONTH, utcnow())
    )
    await redis.hset(key, "*", calls * VALUE_SCALE)


async def test_free_key_fifteen_rapid_calls(api: httpx.AsyncClient) -> None:
    """The brief: 10 per minute on free; the 11th call onwards gets 429 and the headers."""
    account = await sign_up(api, "free")
    replies = [await enforce(api, account, endpoint="/v1/geocode") for _ in range(15)]
    assert [r.status_code for r in replies] == [200] * 10 + [429] * 5
    first, refusal = replies[0], replies[10]
    assert first.headers["RateLimit-Policy"].startswith('"free-per-minute";q=10;w=60')
    assert first.headers["RateLimit"] == '"free-per-minute";r=9;t=6'
    assert first.json()["allowed"] is True and first.json()["remaining"] == 9
    assert refusal.headers["content-type"] == "application/problem+json"
    assert 1 <= int(refusal.headers["Retry-After"]) <= 6
    assert refusal.headers["RateLimit"].startswith('"free-per-minute";r=0;')
    body = refusal.json()
    assert body["type"].endswith("/rate-limited") and body["status"] == 429
    assert body["policy"] == "free-per-minute" and body["allowed"] is False
    assert body["upgrade"]["plan"] == "starter"


async def test_monthly_quota_exhausted(api: httpx.AsyncClient, redis: Redis) -> None:
    account = await sign_up(api, "free")
    await set_usage(redis, account.customer, 999)
    first = await enforce(api, account, mode="reserve", event={"source": "s", "id": "1"})
    assert first.json()["remaining"] == 0
    refusal = await enforce(api, account, mode="reserve", event={"source": "s", "id": "2"})
    assert refusal.status_code == 429
    body = refusal.json()
    assert body["type"].endswith("/quota-exceeded") and body["policy"] == "quota:api_calls"
    assert "starter" in body["upgrade"]["detail"]
    assert int(refusal.headers["Retry-After"]) > 0  # until the period ends
    await set_usage(redis, account.customer, 1000)  # the pipeline caught up: check sees it
    assert (await enforce(api, account)).json()["policy"] == "quota:api_calls"


async def test_soft_quota_allows_overage(api: httpx.AsyncClient, redis: Redis) -> None:
    account = await sign_up(api, "starter")
    await set_usage(redis, account.customer, 60_000)
    reply = await enforce(api, account)
    assert reply.status_code == 200
    quota = next(lim for lim in reply.json()["limits"] if lim["kind"] == "quota")
    assert quota == quota | {"limit": 50_000, "remaining": 0, "hard": False}


async def test_upgrade_mid_window_applies_to_the_next_call(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "free")
    for _ in range(10):
        assert (await enforce(api, account)).status_code == 200
    assert (await enforce(api, account)).status_code == 429
    change = await api.patch(
        f"/v1/admin/customers/{account.customer}", json={"plan": "pro"}, headers=ADMIN
    )
    assert change.status_code == 200 and change.json()["plan"] == "pro"
    reply = await enforce(api, account)
    assert reply.status_code == 200 and reply.json()["plan"] == "pro"
    assert reply.headers["RateLimit-Policy"].startswith('"pro-per-minute";q=500;w=60')


async def test_a_stale_projection_never_lands_after_a_fresh_one(
    api: httpx.AsyncClient, redis: Redis, database_url: str
) -> None:
    """A decision projecting on demand read the row before a plan change committed; its
    stale copy is written while the change's own projection waits, which then lands."""
    account = await sign_up(api, "free")
    account_key = redis_keys.account(account.customer)
    stale = await redis.hgetall(account_key)
    in_flight = await psycopg.AsyncConnection.connect(database_url)
    async with in_flight, in_flight.transaction():
        await lock_projection(in_flight, account.customer)
        change = asyncio.create_task(
            api.patch(
                f"/v1/admin/customers/{account.customer}", json={"plan": "pro"}, headers=ADMIN
            )
        )
        for _ in range(500):
            if await _plan_of(in_flight, account.customer) == "pro":  # committed
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not change.done()  # its projection waits for the one in flight
        await redis.delete(account_key)
        await redis.hset(account_key, mapping=stale)  # type: ignore[arg-type]  # as read
    assert (await change).status_code == 200
    assert await redis.hget(account_key, "plan") == b"pro"
    assert (await enforce(api, account)).json()["plan"] == "pro"


async def _plan_of(conn: psycopg.AsyncConnection, customer: str) -> str:
    cur = await conn.execute("SELECT plan_id FROM customers WHERE id = %s", (customer,))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_plan_edit_applies_to_the_next_call(api: httpx.AsyncClient) -> None:
    plan = plan_with(per_minute=100)
    _, key = await customer_on(api, plan)
    assert (await api.post("/v1/enforce", json={}, headers=key)).json()["remaining"] == 99
    plan["rate_limits"] = [{"name": "per-minute", "limit": 2, "per": "minute"}]
    await put_plan(api, plan)
    replies = [await api.post("/v1/enforce", json={}, headers=key) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert replies[0].headers["RateLimit-Policy"].startswith('"per-minute";q=2;w=60')
    versions = await api.get(f"/v1/admin/plans/{plan['id']}/versions", headers=ADMIN)
    assert [v["version"] for v in versions.json()["versions"]] == [1, 2]
    assert versions.json()["versions"][1]["changed_by"] == "admin"


async def test_expensive_endpoint_costs_more(api: httpx.AsyncClient) -> None:
    plan = plan_with(per_minute=10, endpoint_costs={"/v1/recognize": 4})
    plan["rate_limits"].append(
        {"name": "recognize", "limit": 8, "per": "second", "endpoint": "/v1/recognize"}
    )
    _, key = await customer_on(api, plan)
    reply = await api.post("/v1/enforce", json={"endpoint": "/v1/recognize"}, headers=key)
    limits = {lim["policy"]: lim["remaining"] for lim in reply.json()["limits"]}
    assert limits == {"per-minute": 6, "recognize": 4}  # one call costs 4 of each
    other = await api.post("/v1/enforce", json={"endpoint": "/v1/geocode"}, headers=key)
    assert {lim["policy"]: lim["remaining"] for lim in other.json()["limits"]} == {"per-minute": 5}


async def test_five_hundred_concurrent_callers_hundred_remaining(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    plan = plan_with(quota=1000)
    customer, key = await customer_on(api, plan)
    await set_usage(redis, customer, 900)

    async def caller(i: int) -> int:
        body = {"mode": "reserve", "event": {"source": "api", "id": f"call-{i}"}}
        return (await api.post("/v1/enforce", json=body, headers=key)).status_code

    codes = await asyncio.gather(*(caller(i) for i in range(500)))
    assert codes.count(200) == 100 and codes.count(429) == 400
    held = await redis.hget(redis_keys.held(customer), "api_calls")
    assert int(held or 0) == 100 * VALUE_SCALE


async def test_reservations_settle_when_their_events_are_aggregated(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    ch: ClickHouse,
    meters: dict[str, list[Meter]],
) -> None:
    plan = plan_with(quota=3)
    customer, key = await customer_on(api, plan)
    for i in range(3):
        body = {"mode": "reserve", "event": {"source": "src", "id": f"e{i}"}}
        assert (await api.post("/v1/enforce", json=body, headers=key)).status_code == 200
    # The pipeline counts two of them: usage 2 + held 1 = the limit, still no room.
    events = [call(customer, "api_call", f"e{i}", utcnow()) for i in range(2)]
    await aggregate(settings, ch, redis, meters, events)
    assert int(await redis.hget(redis_keys.held(customer), "api_calls") or 0) == VALUE_SCALE
    reply = await api.post("/v1/enforce", json={}, headers=key)
    assert reply.status_code == 429
    used = next(lim for lim in reply.json()["limits"] if lim["kind"] == "quota")
    assert used["remaining"] == 0


async def test_rotation_grace_then_expiry(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "pro")
    rotated = await api.post(
        f"/v1/keys/{account.key_id}/rotate", json={"grace_seconds": 1}, headers=account.auth
    )
    assert rotated.status_code == 201, rotated.text
    new = {"Authorization": f"Bearer {rotated.json()['key']}"}
    assert (await enforce(api, account)).status_code == 200  # the old key, within grace
    assert (await api.post("/v1/enforce", json={}, headers=new)).status_code == 200
    await asyncio.sleep(1.2)
    expired = await enforce(api, account)
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    assert (await api.post("/v1/enforce", json={}, headers=new)).status_code == 200


async def test_revocation_applies_at_once(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "pro")
    assert (await enforce(api, account)).status_code == 200
    revoke = await api.delete(
        f"/v1/admin/customers/{account.customer}/keys/{account.key_id}", headers=ADMIN
    )
    assert revoke.status_code == 204
    refused = await enforce(api, account)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


async def test_a_key_revoked_while_it_is_rotated_stays_dead(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings
) -> None:
    """The rotation read the key before the revocation committed: no replacement."""
    account = await sign_up(api, "pro")
    async with pool.connection() as conn:
        seen = await accounts.get_key(conn, account.key_id)
    assert seen is not None and seen.revoked_at is None
    revoke = await api.delete(
        f"/v1/admin/customers/{account.customer}/keys/{account.key_id}", headers=ADMIN
    )
    assert revoke.status_code == 204
    async with pool.connection() as conn:
        with pytest.raises(accounts.KeyRevoked):
            await accounts.rotate_key(conn, seen, settings.pepper, timedelta(minutes=1), "test")
        await conn.rollback()
        assert [k.id for k in await accounts.list_keys(conn, account.customer)] == [seen.id]


async def keys_only_key(
    api: httpx.AsyncClient, account: Account, expires_at: datetime | None
) -> dict[str, Any]:
    """A second key of ``account`` that may only manage keys, expiring at ``expires_at``."""
    body: dict[str, Any] = {"scopes": ["keys"]}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    reply = await api.post("/v1/keys", json=body, headers=account.auth)
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


def bearer(issued: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {issued['key']}"}


async def test_a_narrow_key_cannot_rotate_a_wider_one(api: httpx.AsyncClient) -> None:
    """The defect: a keys-only key expiring in a day rotated the full-scope, never-expiring
    key into a new full-scope, never-expiring one (and, with grace 0, locked its owner
    out).  Refused, naming what exceeds the caller's; nothing changes."""
    account = await sign_up(api, "pro")
    day = utcnow() + timedelta(days=1)
    narrow = await keys_only_key(api, account, day)
    attack = await api.post(
        f"/v1/keys/{account.key_id}/rotate", json={"grace_seconds": 0}, headers=bearer(narrow)
    )
    assert attack.status_code == 403, attack.text
    assert attack.headers["content-type"] == "application/problem+json"
    problem = attack.json()
    assert problem["type"].endswith("/scope-escalation")
    assert set(problem["scopes"]) == {"ingest", "enforce", "usage:read", "billing"}
    assert problem["expires_at"] is None
    assert datetime.fromisoformat(problem["caller_expires_at"]) == day
    assert (await enforce(api, account)).status_code == 200  # the target still works
    listed = (await api.get("/v1/keys", headers=account.auth)).json()["keys"]
    assert [(k["id"], k["replaced_by"], k["expires_at"]) for k in listed] == [
        (account.key_id, None, None),
        (narrow["id"], None, narrow["expires_at"]),
    ]


async def test_rotation_refuses_a_longer_life_or_wider_scopes_alone(
    api: httpx.AsyncClient,
) -> None:
    """Each half of the rule on its own: a full-scope key expiring in a day may not
    rotate a never-expiring key; a never-expiring keys-only key may not rotate a key
    with more scopes (and the problem names only what exceeds)."""
    account = await sign_up(api, "pro")
    day = utcnow() + timedelta(days=1)
    mortal = await api.post("/v1/keys", json={"expires_at": day.isoformat()}, headers=account.auth)
    assert mortal.status_code == 201, mortal.text
    outlives = await api.post(
        f"/v1/keys/{account.key_id}/rotate", json={}, headers=bearer(mortal.json())
    )
    assert outlives.status_code == 403, outlives.text
    assert "scopes" not in outlives.json() and outlives.json()["expires_at"] is None
    narrow = await keys_only_key(api, account, None)
    wider = await api.post(
        f"/v1/keys/{mortal.json()['id']}/rotate", json={}, headers=bearer(narrow)
    )
    assert wider.status_code == 403, wider.text
    assert len(wider.json()["scopes"]) == 4 and "caller_expires_at" not in wider.json()
    listed = (await api.get("/v1/keys", headers=account.auth)).json()["keys"]
    assert len(listed) == 3 and all(k["replaced_by"] is None for k in listed)


async def test_creating_a_key_beyond_the_callers_own_is_refused(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "pro")
    day = utcnow() + timedelta(days=1)
    narrow = bearer(await keys_only_key(api, account, day))
    scopes = await api.post(
        "/v1/keys",
        json={"scopes": ["keys", "ingest"], "expires_at": day.isoformat()},
        headers=narrow,
    )
    assert scopes.status_code == 403, scopes.text
    assert scopes.json()["type"].endswith("/scope-escalation")
    assert scopes.json()["scopes"] == ["ingest"] and "caller_expires_at" not in scopes.json()
    later = (day + timedelta(seconds=1)).isoformat()
    for asked in ({"scopes": ["keys"]}, {"scopes": ["keys"], "expires_at": later}):
        refused = await api.post("/v1/keys", json=asked, headers=narrow)
        assert refused.status_code == 403, refused.text
        assert datetime.fromisoformat(refused.json()["caller_expires_at"]) == day
        assert refused.json()["expires_at"] == asked.get("expires_at")
    listed = (await api.get("/v1/keys", headers=account.auth)).json()["keys"]
    assert len(listed) == 2
    within = {"scopes": ["keys"], "expires_at": day.isoformat()}
    assert (await api.post("/v1/keys", json=within, headers=narrow)).status_code == 201


async def test_rotation_within_the_callers_own_bounds(api: httpx.AsyncClient) -> None:
    """A key rotates itself (keeping its scopes and expiry), a full-scope key rotates a
    narrower one, and the admin token rotates anything."""
    account = await sign_up(api, "pro")
    day = utcnow() + timedelta(days=1)
    narrow = await keys_only_key(api, account, day)
    itself = await api.post(f"/v1/keys/{narrow['id']}/rotate", json={}, headers=bearer(narrow))
    assert itself.status_code == 201, itself.text
    assert itself.json()["scopes"] == ["keys"]
    assert datetime.fromisoformat(itself.json()["expires_at"]) == day
    by_wider = await api.post(
        f"/v1/keys/{itself.json()['id']}/rotate", json={}, headers=account.auth
    )
    assert by_wider.status_code == 201, by_wider.text
    assert by_wider.json()["scopes"] == ["keys"]
    assert datetime.fromisoformat(by_wider.json()["expires_at"]) == day
    admin = await api.post(
        f"/v1/admin/customers/{account.customer}/keys/{account.key_id}/rotate",
        json={},
        headers=ADMIN,
    )
    assert admin.status_code == 201, admin.text
    assert len(admin.json()["scopes"]) == 5 and admin.json()["expires_at"] is None


async def test_key_scopes(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "pro")
    issued = await api.post("/v1/keys", json={"scopes": ["usage:read"]}, headers=account.auth)
    assert issued.status_code == 201
    reader = {"Authorization": f"Bearer {issued.json()['key']}"}
    refused = await api.post("/v1/enforce", json={}, headers=reader)
    assert refused.status_code == 403 and refused.json()["scope"] == "enforce"
    usage = await api.get(
        f"/v1/customers/{account.customer}/usage", params={"meter": "api_calls"}, headers=reader
    )
    assert usage.status_code == 200
    listed = await api.get("/v1/keys", headers=account.auth)
    assert [k["last4"] for k in listed.json()["keys"]] == [
        account.key[-4:],
        issued.json()["key"][-4:],
    ]
    assert "key" not in listed.json()["keys"][0]  # secrets are shown once only


async def test_tenant_isolation(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    a, b = await sign_up(api, "pro"), await sign_up(api, "pro")
    other = await enforce(api, a, customer=b.customer)
    assert other.status_code == 403
    usage = await api.get(
        f"/v1/customers/{b.customer}/usage", params={"meter": "api_calls"}, headers=a.auth
    )
    assert usage.status_code == 403
    for attempt in (
        api.post(f"/v1/keys/{b.key_id}/rotate", json={}, headers=a.auth),
        api.delete(f"/v1/keys/{b.key_id}", headers=a.auth),
    ):
        assert (await attempt).status_code == 404
    assert (await enforce(api, b)).status_code == 200  # b's key untouched
    assert (await api.get("/v1/admin/customers", headers=a.auth)).status_code == 401


async def test_brute_force_is_refused_per_address(settings: Settings) -> None:
    async with running_api(settings, ip_auth_failures_per_minute=5) as api:
        valid = await sign_up(api, "pro")
        bogus = "tally_live_" + "A" * 49
        codes = [
            (await api.post("/v1/enforce", json={}, headers={"X-API-Key": bogus})).status_code
            for _ in range(7)
        ]
        assert codes == [401] * 5 + [429] * 2
        blocked = await enforce(api, valid)  # not yet known to this server: a lookup
        assert blocked.status_code == 429 and "Retry-After" in blocked.headers


async def test_account_status(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await sign_up(api, "pro")
    assert (await enforce(api, account)).json()["account_status"] == "trial"
    suspend = await api.patch(
        f"/v1/admin/customers/{account.customer}", json={"status": "cancelled"}, headers=ADMIN
    )
    assert suspend.status_code == 200
    refused = await enforce(api, account)
    assert refused.status_code == 403 and refused.json()["account_status"] == "cancelled"


async def fall_behind(pool: AsyncConnectionPool, customer: str, hours_ago: float) -> None:
    """Make ``customer`` past_due since ``hours_ago`` (the status trigger stamps now)."""
    async with pool.connection() as conn:
        await conn.execute("UPDATE customers SET status = 'past_due' WHERE id = %s", (customer,))
        await conn.execute(
            "UPDATE customers SET status_since = now() - make_interval(secs => %s) WHERE id = %s",
            (hours_ago * 3600, customer),
        )


async def test_past_due_is_admitted_during_the_grace_period_then_refused(
    settings: Settings, pool: AsyncConnectionPool
) -> None:
    async with running_api(settings, past_due_grace_hours=48) as api:
        recent, overdue = await sign_up(api, "starter"), await sign_up(api, "starter")
        await fall_behind(pool, recent.customer, hours_ago=47)
        await fall_behind(pool, overdue.customer, hours_ago=49)
        for account in (recent, overdue):  # re-project, as every status change does
            await api.patch(f"/v1/admin/customers/{account.customer}", json={}, headers=ADMIN)

        admitted = await enforce(api, recent)
        assert admitted.status_code == 200 and admitted.json()["account_status"] == "past_due"
        refused = await enforce(api, overdue)
        assert refused.status_code == 403
        problem = refused.json()
        assert problem["type"].endswith("payment-overdue")
        assert problem["account_status"] == "past_due"
        assert problem["billing_portal"] == f"/v1/customers/{overdue.customer}/billing/portal"
        ended = datetime.fromisoformat(problem["grace_ended_at"])
        assert abs(ended - (utcnow() - timedelta(hours=1))) < timedelta(minutes=1)

        paid = {"status": "active"}  # as invoice.paid does: access comes back at once
        await api.patch(f"/v1/admin/customers/{overdue.customer}", json=paid, headers=ADMIN)
        assert (await enforce(api, overdue)).status_code == 200

    await fall_behind(pool, overdue.customer, hours_ago=72)
    down = {"redis_url": "redis://127.0.0.1:1/0", "past_due_grace_hours": 48}
    async with running_api(settings, **down) as api:  # failing open still refuses it
        reply = await enforce(api, overdue)
        assert reply.status_code == 403 and reply.json()["type"].endswith("payment-overdue")


async def test_expired_trial_moves_to_free(
    api: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    account = await sign_up(api, "starter")
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE customers SET trial_ends_at = %s WHERE id = %s",
            (utcnow() - timedelta(seconds=1), account.customer),
        )
    await api.patch(f"/v1/admin/customers/{account.customer}", json={}, headers=ADMIN)
    reply = await enforce(api, account)
    assert reply.status_code == 200
    assert (reply.json()["plan"], reply.json()["account_status"]) == ("free", "active")


async def test_bad_inputs_each_name_their_field(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "pro")
    cases = [
        ({"meter": "nope"}, 422, "body.meter"),
        ({"quantity": "-1"}, 422, "body.quantity"),
        ({"quantity": "0.0000001"}, 422, "body.quantity"),
        ({"quantity": "1_0"}, 422, "body.quantity"),
        ({"quantity": " 1"}, 422, "body.quantity"),
        ({"mode": "reserve"}, 422, "body.event"),
        ({"mode": "sometimes"}, 422, "body.mode"),
        ({"endpoint": "/v1/a\x00b"}, 422, "body.endpoint"),
        ({"endpoint": "/" + "e" * 256}, 422, "body.endpoint"),  # longer than its events'
    ]
    for body, status, field in cases:
        reply = await enforce(api, account, **body)
        assert reply.status_code == status, (body, reply.text)
        assert reply.json()["errors"][0]["field"] == field
    service = {"Authorization": "Bearer test-token"}
    no_customer = await api.post("/v1/enforce", json={}, headers=service)
    assert no_customer.json()["errors"][0]["field"] == "body.customer"
    unknown = await api.post("/v1/enforce", json={"customer": "nobody-here"}, headers=service)
    assert unknown.status_code == 404
    typo = account.key[:-1] + ("x" if account.key[-1] != "x" else "y")
    for header in ({}, {"X-API-Key": "sk_live_123"}, {"X-API-Key": typo}):
        reply = await api.post("/v1/enforce", json={}, headers=header)
        assert reply.status_code == 401 and reply.headers["content-type"].startswith(
            "application/problem+json"
        )
    signup = await api.post(
        "/v1/signup", json={"email": "x@example.com", "company": "X", "plan": "gold"}
    )
    assert signup.status_code == 422 and signup.json()["errors"][0]["field"] == "body.plan"
    bad_email = await api.post("/v1/signup", json={"email": "nope", "company": "X"})
    assert bad_email.json()["errors"][0]["field"] == "body.email"
    taken = await api.post("/v1/signup", json={"email": account.email.upper(), "company": "Again"})
    assert taken.status_code == 409 and taken.json()["type"].endswith("/email-taken")
    gzipped = account.auth | {"Content-Encoding": "gzip"}
    for path in ("/v1/enforce", "/v1/enforce/batch", "/v1/leases", "/v1/leases/return"):
        encoded = await api.post(path, content=gzip.compress(b"{}"), headers=gzipped)
        assert encoded.status_code == 415, (path, encoded.text)
        assert encoded.json()["type"].endswith("/unsupported-encoding"), path
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        for path in ("/v1/enforce", "/v1/enforce/batch", "/v1/leases", "/v1/leases/return"):
            typed = await api.post(
                path, content=b"{}", headers=account.auth | {"Content-Type": kind}
            )
            assert typed.status_code == 415, (path, kind, typed.text)
            assert typed.json()["type"].endswith("/unsupported-media-type"), path
            assert kind in typed.json()["detail"], path
    untyped = await api.post("/v1/enforce", content=b'{"meter": "api_calls"}', headers=account.auth)
    assert untyped.status_code == 200, untyped.text  # no Content-Type: JSON, as FastAPI takes it
    suffixed = account.auth | {"Content-Type": "application/vnd.api+json; charset=utf-8"}
    assert (await api.post("/v1/enforce", content=b"{}", headers=suffixed)).status_code == 200
    json_typed = account.auth | {"Content-Type": "application/json"}
    for path in ("/v1/enforce", "/v1/enforce/batch", "/v1/leases", "/v1/signup"):
        not_json = await api.post(path, content=b'{"meter": ', headers=json_typed)
        assert not_json.status_code == 400, (path, not_json.text)
        assert not_json.json()["type"].endswith("/malformed-json"), path
        assert "not valid JSON" in not_json.json()["detail"], path
        assert not_json.json()["errors"][0]["field"] == "body", path


async def test_a_meter_created_after_a_miss_is_enforced(
    settings: Settings, pool: AsyncConnectionPool, tenant: str
) -> None:
    """Unknown meters are answered from the cached meters, without a query; a meter
    created right after a miss is known within seconds (the catalog's notification: the
    safety-net reload is 600 s off)."""
    name = f"m_{tenant}"
    async with running_api(settings, meter_refresh_seconds=600) as api:
        account = await sign_up(api, "free")
        miss = await enforce(api, account, meter=name)
        assert miss.status_code == 422 and "unknown meter" in miss.text
        try:
            async with pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO meters (name, event_type, aggregation) VALUES (%s, 'x', 'count')",
                    (name,),
                )
            for _ in range(250):
                reply = await enforce(api, account, meter=name)
                if "unknown meter" not in reply.text:
                    break
                await asyncio.sleep(0.02)
            assert reply.status_code == 200, reply.text
        finally:
            async with pool.connection() as conn:
                await conn.execute("DELETE FROM meters WHERE name = %s", (name,))


async def test_batch(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "free")
    checks = [{}] * 11 + [{"meter": "nope"}, {"quantity": -2}]
    reply = await api.post("/v1/enforce/batch", json={"checks": checks}, headers=account.auth)
    statuses = [r["status"] for r in reply.json()["results"]]
    assert statuses == [200] * 10 + [429, 422, 422]
    results = reply.json()["results"]
    assert results[11]["body"]["errors"][0]["field"] == "checks[11].meter"  # as schema errors
    assert results[12]["body"]["errors"][0]["field"] == "checks[12].quantity"


async def test_service_token_acts_for_any_customer(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "free")
    service = {"Authorization": "Bearer test-token"}
    reply = await api.post("/v1/enforce", json={"customer": account.customer}, headers=service)
    assert reply.status_code == 200 and reply.json()["customer"] == account.customer


async def test_redis_unreachable_fail_open_and_closed(settings: Settings) -> None:
    down = "redis://127.0.0.1:1/0"
    async with running_api(settings) as api:
        account = await sign_up(api, "free")
        assert (await enforce(api, account)).status_code == 200
    async with running_api(settings, redis_failure_mode="closed", redis_url=down) as api:
        service = {"Authorization": "Bearer test-token"}
        reply = await api.post("/v1/enforce", json={"customer": account.customer}, headers=service)
        assert reply.status_code == 503 and reply.json()["type"].endswith("unavailable")
    before = REGISTRY.get_sample_value("tally_enforce_fallback_total", {"mode": "open"}) or 0
    async with running_api(
        settings, redis_failure_mode="open", redis_url=down, fallback_rate_per_minute=3
    ) as api:
        service = {"Authorization": "Bearer test-token"}
        replies = [
            await api.post("/v1/enforce", json={"customer": account.customer}, headers=service)
            for _ in range(4)
        ]
        assert [r.status_code for r in replies] == [200, 200, 200, 429]
        assert replies[0].json()["fallback"] is True
        metrics = (await api.get("/metrics")).text
        assert f'tally_enforce_fallback_total{{mode="open"}} {before + 4}' in metrics
        assert "tally_enforce_redis_available 0.0" in metrics


async def test_keys_work_without_redis_when_failing_open(settings: Settings) -> None:
    async with running_api(settings) as api:
        account = await sign_up(api, "free")
    async with running_api(settings, redis_url="redis://127.0.0.1:1/0") as api:
        reply = await enforce(api, account)
        assert reply.status_code == 200 and reply.json()["fallback"] is True
        bogus = await api.post("/v1/enforce", json={}, headers={"X-API-Key": "nope"})
        assert bogus.status_code == 401


async def test_review_fixes_limits(api: httpx.AsyncClient, redis: Redis) -> None:
    """Policies whose algorithm changes, endpoint limits that outlive other calls, a
    reservation re-sent with another quantity, quantities beyond exact arithmetic."""
    plan = plan_with(per_minute=1000, quota=100)
    plan["rate_limits"].append({"name": "export", "limit": 2, "per": "day", "endpoint": "/export"})
    plan["rate_limits"][0]["algorithm"] = "sliding_window"
    customer, key = await customer_on(api, plan)
    for _ in range(2):
        assert (
            await api.post("/v1/enforce", json={"endpoint": "/export"}, headers=key)
        ).status_code == 200
    assert (await api.post("/v1/enforce", json={"endpoint": "/x"}, headers=key)).status_code == 200
    assert await redis.pttl(redis_keys.rate_states(customer)) > 86_400_000
    assert (
        await api.post("/v1/enforce", json={"endpoint": "/export"}, headers=key)
    ).status_code == 429
    plan["rate_limits"][0]["algorithm"] = "token_bucket"
    await put_plan(api, plan)
    assert (await api.post("/v1/enforce", json={}, headers=key)).status_code == 200
    event = {"source": "s", "id": "once"}
    first = await api.post("/v1/enforce", json={"mode": "reserve", "event": event}, headers=key)
    again = await api.post("/v1/enforce", json={"mode": "reserve", "event": event}, headers=key)
    bigger = await api.post(
        "/v1/enforce", json={"mode": "reserve", "event": event, "quantity": 50}, headers=key
    )
    assert (first.status_code, again.status_code, bigger.status_code) == (200, 200, 409)
    huge = await api.post("/v1/enforce", json={"quantity": 2 * 10**9}, headers=key)
    assert huge.status_code == 422 and huge.json()["errors"][0]["field"] == "body.quantity"


async def test_restricted_keys_cannot_widen_themselves(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "pro")
    issued = await api.post("/v1/keys", json={"scopes": ["enforce", "keys"]}, headers=account.auth)
    limited = {"Authorization": f"Bearer {issued.json()['key']}"}
    wider = await api.post("/v1/keys", json={"scopes": ["ingest"]}, headers=limited)
    assert wider.status_code == 403 and wider.json()["scopes"] == ["ingest"]
    reader = await api.post("/v1/keys", json={"scopes": ["usage:read"]}, headers=account.auth)
    read_only = {"Authorization": f"Bearer {reader.json()['key']}"}
    assert (await api.get("/v1/keys", headers=read_only)).status_code == 403


async def test_failing_open_still_refuses_revoked_keys(settings: Settings) -> None:
    async with running_api(settings) as api:
        account = await sign_up(api, "free")
        await api.delete(
            f"/v1/admin/customers/{account.customer}/keys/{account.key_id}", headers=ADMIN
        )
    async with running_api(settings, redis_url="redis://127.0.0.1:1/0") as api:
        reply = await enforce(api, account)
        assert reply.status_code == 401 and "revoked" in reply.json()["detail"]


async def test_admin_and_key_bad_inputs(api: httpx.AsyncClient) -> None:
    """Each refused with its status and the field at fault; nothing half-saved."""

    async def field(reply: httpx.Response, status: int) -> str:
        assert reply.status_code == status, reply.text
        assert reply.headers["content-type"].startswith("application/problem+json")
        errors = reply.json().get("errors") or [{"field": ""}]
        return str(errors[0]["field"])

    bad_plans = [
        (plan_with() | {"id": "other-id"}, "body.id"),
        (plan_with(quotas={"storage_gb": {"limit": 5}}), "body"),
        (plan_with(prices={"nope": {"unit_price": "1"}}), "body"),
        (plan_with(upgrade_to="gold"), "body"),
        (plan_with(endpoint_costs={"/x": 50}, per_minute=10), "body"),
        (
            plan_with()
            | {"rate_limits": [{"name": "g", "limit": 5000, "per": "second", "algorithm": "gcra"}]},
            "body.rate_limits[0]",
        ),
        (plan_with() | {"price": "-1"}, "body.price"),
    ]
    for plan, where in bad_plans:
        path = "/v1/admin/plans/" + ("p-x" if plan["id"] == "other-id" else plan["id"])
        reply = await api.put(path, json=plan, headers=ADMIN)
        assert (await field(reply, 422)).startswith(where), reply.text
        assert (
            await api.get(f"/v1/admin/plans/{plan['id']}/versions", headers=ADMIN)
        ).status_code == 404
    assert (await api.get("/v1/admin/plans")).status_code == 401

    account = await sign_up(api, "pro")
    customers = "/v1/admin/customers"
    assert (
        await field(
            await api.post(
                customers, json={"email": "x@example.com", "plan": "gold"}, headers=ADMIN
            ),
            422,
        )
        == "body.plan"
    )
    again = {"id": account.customer, "email": "new@example.com", "plan": "free"}
    assert (await api.post(customers, json=again, headers=ADMIN)).status_code == 409
    one = f"{customers}/{account.customer}"
    assert (
        await field(await api.patch(one, json={"status": "asleep"}, headers=ADMIN), 422)
        == "body.status"
    )
    assert (
        await field(await api.patch(one, json={"plan": "gold"}, headers=ADMIN), 422) == "body.plan"
    )
    assert (await api.patch(f"{customers}/nobody", json={}, headers=ADMIN)).status_code == 404

    keys = account.auth
    past = (utcnow() - timedelta(days=1)).isoformat()
    assert (
        await field(await api.post("/v1/keys", json={"expires_at": past}, headers=keys), 422)
        == "body.expires_at"
    )
    for epoch in (1796000000, "1796000000"):  # not read as seconds since 1970
        refused = await api.post("/v1/keys", json={"expires_at": epoch}, headers=keys)
        assert await field(refused, 422) == "body.expires_at"
        assert "RFC 3339" in refused.json()["errors"][0]["reason"]
    assert (
        await field(await api.post("/v1/keys", json={"scopes": []}, headers=keys), 422)
        == "body.scopes"
    )
    assert (
        await field(await api.post("/v1/keys", json={"scopes": ["root"]}, headers=keys), 422)
        == "body.scopes[0]"
    )
    rotate = f"/v1/keys/{account.key_id}/rotate"
    too_long = {"grace_seconds": 10**9}
    assert (
        await field(await api.post(rotate, json=too_long, headers=keys), 422)
        == "body.grace_seconds"
    )
    assert (await api.post("/v1/keys/key_nope/rotate", json={}, headers=keys)).status_code == 404
    spare = (await api.post("/v1/keys", json={}, headers=keys)).json()
    await api.delete(f"/v1/keys/{spare['id']}", headers=keys)
    assert (
        await api.post(f"/v1/keys/{spare['id']}/rotate", json={}, headers=keys)
    ).status_code == 409

    many: dict[str, Any] = {"checks": [{}] * 101}
    assert (
        await field(await api.post("/v1/enforce/batch", json=many, headers=keys), 422)
        == "body.checks"
    )
    assert (
        await field(await api.post("/v1/enforce/batch", json={"checks": []}, headers=keys), 422)
        == "body.checks"
    )


async def test_a_plan_may_ask_for_the_legacy_x_ratelimit_headers(api: httpx.AsyncClient) -> None:
    """Clients written against ``X-RateLimit-*`` (the brief's examples) read them when the
    plan opts in: the policy closest to refusing, Reset in Unix seconds."""
    legacy = plan_with(per_minute=2, legacy_ratelimit_headers=True)
    _, auth = await customer_on(api, legacy)
    replies = [await api.post("/v1/enforce", json={}, headers=auth) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    first, refusal = replies[0].headers, replies[2].headers
    assert (first["X-RateLimit-Limit"], first["X-RateLimit-Remaining"]) == ("2", "1")
    now = time.time()
    assert now < int(first["X-RateLimit-Reset"]) <= now + 61
    assert refusal["X-RateLimit-Remaining"] == "0" and "RateLimit" in refusal
    _, plain = await customer_on(api, plan_with(per_minute=2))
    answer = await api.post("/v1/enforce", json={}, headers=plain)
    assert "RateLimit" in answer.headers and "X-RateLimit-Limit" not in answer.headers
