"""Leases over HTTP and below it, against real Redis and PostgreSQL (and chDB for events).

The brief's exactness scenario runs two API servers and two simulated app processes that
admit calls only from their leases; the rest checks sizes, refusals, settlement by
events, expiry, returns, and every bad input.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.events import LEASE_ID_PATTERN, VALUE_SCALE, utcnow
from services.api.enforcement.leaser import Grant, LeaseAsk, LeaseMode, Leaser, new_lease_id
from services.api.enforcement.limiter import Code
from services.api.enforcement.pipelined import Pipelined
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.accounts_support import ADMIN, Account, customer_on, plan_with, running_api, sign_up
from tests.conftest import REDIS_URL
from tests.integration.test_enforcement import set_usage
from tests.integration.test_usage_api import aggregate
from tests.lease_support import (
    METER,
    catalog_meters,
    count,
    put_account,
    spent_events,
    usage_and_held,
)

TTL_MS, SETTLE_MS = 2000, 300_000


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings) as client:
        yield client


@pytest.fixture
async def leaser() -> AsyncIterator[Leaser]:
    connection = Pipelined(REDIS_URL, 5.0)
    yield Leaser(connection, TTL_MS, SETTLE_MS, 8)
    await connection.aclose()


async def lease(client: httpx.AsyncClient, auth: dict[str, str], **body: Any) -> httpx.Response:
    return await client.post("/v1/leases", json=body, headers=auth)


async def give_back(client: httpx.AsyncClient, auth: dict[str, str], **body: Any) -> httpx.Response:
    return await client.post("/v1/leases/return", json=body, headers=auth)


async def test_a_lease_takes_a_share_of_the_tightest_limit(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    customer, auth = await customer_on(api, plan_with(quota=100))
    reply = await lease(api, auth, want=50)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert re.match(LEASE_ID_PATTERN, body["lease"])
    assert body["granted"] == 12  # 100 left, a share of 1/8
    assert body | {"customer": customer, "meter": METER, "endpoint": "", "ttl_ms": 2000} == body
    assert body["tokens"] == {"per-minute": 12} and body["returned"] == 0
    ends = datetime.fromisoformat(body["expires_at"])
    assert timedelta(seconds=1) < ends - utcnow() <= timedelta(seconds=2)
    quota = next(lim for lim in body["limits"] if lim["kind"] == "quota")
    assert quota["remaining"] == 88
    assert reply.headers[
        "RateLimit-Policy"
    ] == '"per-minute";q=100000;w=60, "quota:api_calls";q=100;w=' + str(quota["window"])
    assert reply.headers["RateLimit"].startswith('"quota:api_calls";r=88;')
    assert await usage_and_held(redis, customer) == (0, 12 * VALUE_SCALE)


async def test_a_rate_limit_of_ten_a_minute_is_never_exceeded(api: httpx.AsyncClient) -> None:
    """Near a rate limit a lease is one call: ten leases of one, then refusals."""
    account = await sign_up(api, "free")
    grants = [await lease(api, account.auth, want=5, endpoint="/v1/geocode") for _ in range(14)]
    assert [g.status_code for g in grants] == [200] * 10 + [429] * 4
    assert [g.json()["granted"] for g in grants[:10]] == [1] * 10
    assert grants[0].json()["tokens"] == {"free-per-minute": 1}
    refusal = grants[10]
    assert refusal.headers["content-type"] == "application/problem+json"
    assert refusal.json()["type"].endswith("/rate-limited")
    assert refusal.json()["policy"] == "free-per-minute"
    assert 1 <= int(refusal.headers["Retry-After"]) <= 60
    assert refusal.headers["RateLimit"].startswith('"free-per-minute";r=0;')


class EdgeApp:
    """An app process admitting calls only from leases, as the SDK will: waiting calls
    are served from the current lease, one renewal at a time asks for as many units as
    calls wait, and a refusal refuses the calls waiting then."""

    def __init__(self, client: httpx.AsyncClient, account: Account) -> None:
        self.client, self.account = client, account
        self.waiting: list[asyncio.Future[bool]] = []
        self.lease: str | None = None
        self.spent = 0
        self.events: list[StoredEvent] = []
        self.refusals: list[httpx.Response] = []
        self._renewing: asyncio.Task[None] | None = None

    async def call(self) -> bool:
        admitted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiting.append(admitted)
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew())
        return await admitted

    async def _renew(self) -> None:
        while self.waiting:
            body: dict[str, Any] = {"want": len(self.waiting)}
            if self.lease:
                body |= {"lease": self.lease, "spent": self.spent}
            reply = await lease(self.client, self.account.auth, **body)
            if reply.status_code == 429:
                self.refusals.append(reply)
                self.spent = 0
                for call in self.waiting:
                    call.set_result(False)
                self.waiting.clear()
                return
            assert reply.status_code == 200, reply.text
            granted = reply.json()
            self.lease, self.spent = granted["lease"], granted["granted"]
            served, self.waiting = self.waiting[: self.spent], self.waiting[self.spent :]
            self.events += spent_events(self.account.customer, self.lease, len(served))
            for call in served:
                call.set_result(True)


async def test_500_calls_over_two_apps_against_100_left_serve_exactly_100(
    settings: Settings,
    redis: Redis,
    ch: ClickHouse,
    meters: dict[str, list[Meter]],
) -> None:
    async with running_api(settings) as one, running_api(settings) as two:
        account = await sign_up(one, "free")
        apps = [EdgeApp(one, account), EdgeApp(two, account)]
        # free allows 10 calls a minute: lift it, keep its hard quota of 1000
        await put_rate(one, account, 100_000)
        await set_usage(redis, account.customer, 900)
        served = await asyncio.gather(*(apps[i % 2].call() for i in range(500)))
        assert sum(served) == 100
        for app in apps:
            assert app.refusals, "each app was refused once the quota was spent"
            refusal = app.refusals[0]
            assert refusal.json()["type"].endswith("/quota-exceeded")
            assert refusal.headers["RateLimit"].startswith('"quota:api_calls";r=0;')
            assert int(refusal.headers["Retry-After"]) > 0
        used, held = await usage_and_held(redis, account.customer)
        assert (used, held) == (900 * VALUE_SCALE, 100 * VALUE_SCALE)
        events = apps[0].events + apps[1].events
        await aggregate(settings, ch, redis, meters, events)  # the real batch processor
        assert await usage_and_held(redis, account.customer) == (1000 * VALUE_SCALE, 0)
        for app in apps:
            returned = await give_back(app.client, account.auth, lease=app.lease, spent=0)
            assert returned.status_code == 200 and returned.json()["held"] == 0


async def put_rate(client: httpx.AsyncClient, account: Account, per_minute: int) -> None:
    """Move ``account`` to a plan with free's quota and ``per_minute`` calls a minute."""
    plan = plan_with(quota=1000, per_minute=per_minute)
    reply = await client.put(f"/v1/admin/plans/{plan['id']}", json=plan, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    moved = await client.patch(
        f"/v1/admin/customers/{account.customer}", json={"plan": plan["id"]}, headers=ADMIN
    )
    assert moved.status_code == 200, moved.text


async def test_events_settle_what_they_spent(redis: Redis, leaser: Leaser, tenant: str) -> None:
    customer, meters = f"{tenant}-settle", catalog_meters()
    await put_account(redis, customer, quota=100)
    take = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, 50)
    grant = await leaser.ask(customer, take, utcnow())
    assert grant.granted == 12
    events = spent_events(customer, take.lease, 5)
    await count(redis, customer, events, meters)
    assert await usage_and_held(redis, customer) == (5 * VALUE_SCALE, 7 * VALUE_SCALE)
    back = await leaser.ask(customer, LeaseAsk(take.lease, LeaseMode.RETURN, spent=5), utcnow())
    assert back.outcome.code is Code.RETURNED and back.freed == 7 and back.held == 0
    assert await usage_and_held(redis, customer) == (5 * VALUE_SCALE, 0)
    # returned before its events arrive: the spent part stays held until they do
    again = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, 50)
    assert (await leaser.ask(customer, again, utcnow())).granted == 11  # 95 left
    back = await leaser.ask(customer, LeaseAsk(again.lease, LeaseMode.RETURN, spent=4), utcnow())
    assert back.freed == 7 and back.held == 4
    assert await usage_and_held(redis, customer) == (5 * VALUE_SCALE, 4 * VALUE_SCALE)
    await count(redis, customer, spent_events(customer, again.lease, 4), meters)
    assert await usage_and_held(redis, customer) == (9 * VALUE_SCALE, 0)


async def test_an_unreturned_lease_is_released_after_its_settle_window(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    customer = f"{tenant}-expiry"
    await put_account(redis, customer, quota=100)
    start = int(utcnow().timestamp() * 1000)

    async def take(at_ms: int) -> int:
        ask = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, 100)
        return (await leaser.ask(customer, ask, utcnow(), at_ms * 1000)).granted

    assert await take(start) == 12
    # ended, but what it spent may still be on its way: still held
    assert await take(start + TTL_MS + 1) == 11  # 88 left
    assert await usage_and_held(redis, customer) == (0, 23 * VALUE_SCALE)
    # past the first lease's settle window its 12 come back, whatever it spent
    assert await take(start + TTL_MS + SETTLE_MS) == 11  # 89 left
    assert await usage_and_held(redis, customer) == (0, 22 * VALUE_SCALE)


async def test_a_revoked_key_or_a_plan_change_reaches_the_next_lease(
    api: httpx.AsyncClient,
) -> None:
    """The bound: a holder learns at its next renewal, at most ``ttl_ms`` later."""
    account = await sign_up(api, "free")
    first = await lease(api, account.auth, want=5)
    assert first.status_code == 200 and first.json()["plan"] == "free"
    ident = first.json()["lease"]
    change = await api.patch(
        f"/v1/admin/customers/{account.customer}", json={"plan": "pro"}, headers=ADMIN
    )
    assert change.status_code == 200
    renewed = await lease(api, account.auth, want=5, lease=ident, spent=1)
    assert renewed.status_code == 200 and renewed.json()["plan"] == "pro"
    assert renewed.json()["lease"] == ident
    assert renewed.headers["RateLimit-Policy"].startswith('"pro-per-minute";q=500;w=60')
    revoke = await api.delete(
        f"/v1/admin/customers/{account.customer}/keys/{account.key_id}", headers=ADMIN
    )
    assert revoke.status_code == 204 and not revoke.content
    assert "content-type" not in revoke.headers
    refused = await lease(api, account.auth, want=5, lease=ident, spent=0)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


async def test_only_a_key_that_may_take_a_lease_may_renew_or_return_one(
    api: httpx.AsyncClient,
) -> None:
    """A read-only key and a revoked key of the same customer, knowing a lease's id, are
    refused its renewal and its return as they are a take, and the lease is untouched:
    its holder still gets all its unspent units back."""
    account = await sign_up(api, "pro")
    reader = await api.post("/v1/keys", json={"scopes": ["usage:read"]}, headers=account.auth)
    read_only = {"Authorization": f"Bearer {reader.json()['key']}"}
    spare = await api.post("/v1/keys", json={"scopes": ["enforce"]}, headers=account.auth)
    revoked = {"Authorization": f"Bearer {spare.json()['key']}"}
    gone = await api.delete(f"/v1/keys/{spare.json()['id']}", headers=account.auth)
    assert gone.status_code == 204 and "content-type" not in gone.headers, gone.headers
    taken = await lease(api, account.auth, want=5)
    assert taken.status_code == 200, taken.text
    ident, granted = taken.json()["lease"], taken.json()["granted"]
    for auth, status in ((read_only, 403), (revoked, 401)):
        renewed = await lease(api, auth, want=1, lease=ident, spent=0)
        returned = await give_back(api, auth, lease=ident, spent=0)
        for refused in (renewed, returned):
            assert refused.status_code == status, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
    back = await give_back(api, account.auth, lease=ident, spent=0)
    assert back.status_code == 200 and back.json()["returned"] == granted, back.text


async def test_spending_more_than_the_term_granted_is_refused_and_changes_nothing(
    api: httpx.AsyncClient,
) -> None:
    account = await sign_up(api, "pro")
    taken = await lease(api, account.auth, want=5)
    ident, granted = taken.json()["lease"], taken.json()["granted"]
    renewed = await lease(api, account.auth, want=1, lease=ident, spent=granted + 1)
    returned = await give_back(api, account.auth, lease=ident, spent=granted + 1)
    for refused in (renewed, returned):
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["errors"][0]["field"] == "body.spent"
        assert f"the {granted} lease {ident} granted" in refused.json()["detail"]
    back = await give_back(api, account.auth, lease=ident, spent=granted - 1)
    assert back.status_code == 200 and back.json()["returned"] == 1, back.text


async def test_a_suspended_account_is_refused_its_next_lease(api: httpx.AsyncClient) -> None:
    account = await sign_up(api, "pro")
    assert (await lease(api, account.auth, want=5)).status_code == 200
    suspend = await api.patch(
        f"/v1/admin/customers/{account.customer}", json={"status": "cancelled"}, headers=ADMIN
    )
    assert suspend.status_code == 200
    refused = await lease(api, account.auth, want=5)
    assert refused.status_code == 403 and refused.json()["account_status"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"want": 0}, "body.want"),
        ({"want": 10_001}, "body.want"),
        ({"want": 1.5}, "body.want"),
        ({"want": "10"}, "body.want"),  # a number, not a string that reads as one
        ({"want": True}, "body.want"),
        ({"want": 5, "lease": "ls_AAAAAAAAAAAAAAAA", "spent": "1"}, "body.spent"),
        ({}, "body.want"),
        ({"want": 5, "meter": "no_such_meter"}, "body.meter"),
        ({"want": 5, "lease": "not-a-lease"}, "body.lease"),
        ({"want": 5, "lease": "ls_AAAAAAAAAAAAAAAA"}, "body.spent"),  # renewing needs it
        ({"want": 5, "lease": "ls_AAAAAAAAAAAAAAAA", "spent": -1}, "body.spent"),
        ({"want": 5, "colour": "red"}, "body.colour"),
        # as /v1/enforce and an event's endpoint: a lease its events could not settle
        ({"want": 5, "endpoint": "/v1/a\x00b"}, "body.endpoint"),
        ({"want": 5, "endpoint": "/" + "e" * 256}, "body.endpoint"),
        ({"want": 5, "term": 1}, "body.term"),  # a term of which lease?
        ({"want": 5, "spent": 3}, "body.spent"),  # spent of which lease?
        ({"want": 5, "lease": "ls_AAAAAAAAAAAAAAAA", "term": 1, "spent": 0}, "body.spent"),
        ({"want": 5, "lease": "ls_AAAAAAAAAAAAAAAA", "term": 2}, "body.spent"),
        ({"want": 5, "lease": "ls_AAAAAAAAAAAAAAAA", "term": 0}, "body.term"),
    ],
)
async def test_bad_lease_requests_name_the_field(
    api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    account = await sign_up(api, "pro")
    reply = await lease(api, account.auth, **body)
    assert reply.status_code == 422, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert field in [e["field"] for e in reply.json()["errors"]]


@pytest.mark.parametrize(
    "path", ["/v1/leases", "/v1/leases/return", "/v1/enforce", "/v1/enforce/batch"]
)
async def test_a_caller_without_a_key_learns_that_before_what_its_body_lacks(
    api: httpx.AsyncClient, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer tally_live_nope"}):
        reply = await api.post(path, content=b'{"want": "many"', headers=headers)
        assert reply.status_code == 401, reply.text
        assert reply.headers["content-type"] == "application/problem+json"


async def test_unknown_and_foreign_leases_are_404_naming_the_lease(
    api: httpx.AsyncClient,
) -> None:
    mine, theirs = await sign_up(api, "pro"), await sign_up(api, "pro")
    taken = (await lease(api, theirs.auth, want=5)).json()
    foreign = taken["lease"]
    for ident in ("ls_AAAAAAAAAAAAAAAA", foreign):
        for reply in (
            await lease(api, mine.auth, want=5, lease=ident, spent=0),
            await give_back(api, mine.auth, lease=ident, spent=0),
        ):
            assert reply.status_code == 404, reply.text
            assert reply.json()["type"].endswith("/unknown-lease")
            assert reply.json()["errors"] == [{"field": "body.lease", "reason": "unknown lease"}]
    # the other customer's lease is untouched, and still theirs to return
    back = await give_back(api, theirs.auth, lease=foreign, spent=0)
    assert back.status_code == 200 and back.json()["returned"] == taken["granted"] > 0


async def test_renewing_under_another_meter_or_without_a_customer_is_refused(
    api: httpx.AsyncClient,
) -> None:
    account = await sign_up(api, "pro")
    ident = (await lease(api, account.auth, want=5)).json()["lease"]
    other = await lease(api, account.auth, want=5, lease=ident, spent=0, meter="storage_gb")
    assert other.status_code == 422
    assert other.json()["errors"][0]["field"] == "body.meter"
    service = {"Authorization": "Bearer test-token"}
    nobody = await lease(api, service, want=5)
    assert nobody.status_code == 422 and nobody.json()["errors"][0]["field"] == "body.customer"
    ok = await lease(api, service, want=5, customer=account.customer)
    assert ok.status_code == 200 and ok.json()["customer"] == account.customer
    back = await give_back(api, account.auth, lease=ident, spent=2)
    assert back.status_code == 200
    assert back.json() | {"lease": ident, "meter": METER} == back.json()


async def test_a_resent_take_or_renewal_is_answered_again_not_granted_again(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    """A numbered request sent twice (the SDK's connection dropped before the answer)
    gets the first answer back: one grant's units held, one grant's tokens taken, and a
    renewal frees the old term's unspent units once, never the new term's."""
    customer, auth = await customer_on(api, plan_with(quota=100))
    ident = new_lease_id()
    take = {"want": 50, "lease": ident, "term": 1}
    first, again = await lease(api, auth, **take), await lease(api, auth, **take)
    assert first.status_code == again.status_code == 200, again.text
    assert same_grant(first, again) and first.json()["granted"] == 12
    assert first.json()["lease"] == ident and first.json()["term"] == 1
    assert again.headers["RateLimit"] == first.headers["RateLimit"]
    assert await usage_and_held(redis, customer) == (0, 12 * VALUE_SCALE)
    renew = {"want": 50, "lease": ident, "term": 2, "spent": 2}
    first, again = await lease(api, auth, **renew), await lease(api, auth, **renew)
    assert same_grant(first, again), again.text
    assert first.json()["returned"] == 10 and first.json()["granted"] == 12  # 98 left
    assert await usage_and_held(redis, customer) == (0, 14 * VALUE_SCALE)  # 2 spent + 12
    refused = await lease(api, auth, want=5, lease=ident, term=1)  # its id is taken
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "body.lease"
    other = await lease(api, auth, **renew | {"endpoint": "/v1/other"})  # not a resend
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "body.term"
    assert same_grant(first, await lease(api, auth, **renew))  # the resend still is
    back = await give_back(api, auth, lease=ident, spent=0)
    assert back.json()["returned"] == 12 and back.json()["held"] == 2


def same_grant(first: httpx.Response, again: httpx.Response) -> bool:
    """The same answer, but for the time its term has left (less when resent)."""
    a: dict[str, Any] = first.json()
    b: dict[str, Any] = again.json()
    assert 0 <= b.pop("expires_in_ms") <= a.pop("expires_in_ms") == 2000
    return a == b


async def test_late_copies_of_older_requests_change_nothing(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    """Only the next term is granted: a renewal of an older term arriving late (its first
    try timed out, the resend was answered, the lease renewed on) is refused, as are a
    return of an older term and any renewal once the lease is returned."""
    customer, auth = await customer_on(api, plan_with(quota=100))
    ident = new_lease_id()
    assert (await lease(api, auth, want=50, lease=ident, term=1)).json()["granted"] == 12
    second = {"want": 50, "lease": ident, "term": 2, "spent": 12}
    assert (await lease(api, auth, **second)).json()["granted"] == 11
    third = await lease(api, auth, want=50, lease=ident, term=3, spent=1)
    assert third.json()["granted"] == 10 and third.json()["returned"] == 10  # 13 spent + 10
    assert await usage_and_held(redis, customer) == (0, 23 * VALUE_SCALE)
    for late in (second, {"want": 50, "lease": ident, "term": 5, "spent": 0}):
        refused = await lease(api, auth, **late)
        assert refused.status_code == 404, refused.text
        assert refused.json()["errors"] == [
            {"field": "body.term", "reason": "not the lease's next term"}
        ]
    stale = await give_back(api, auth, lease=ident, spent=0, term=2)
    assert stale.status_code == 404
    assert await usage_and_held(redis, customer) == (0, 23 * VALUE_SCALE)  # nothing moved
    back = await give_back(api, auth, lease=ident, spent=4, term=3)
    assert back.json()["returned"] == 6 and back.json()["held"] == 17  # 12 + 1 + 4 spent
    resent = await lease(api, auth, want=50, lease=ident, term=3, spent=1)  # after the return
    assert resent.status_code == 404, resent.text
    fourth = await lease(api, auth, want=50, lease=ident, term=4, spent=4)
    assert fourth.status_code == 404, fourth.text
    assert await usage_and_held(redis, customer) == (0, 17 * VALUE_SCALE)


@pytest.mark.parametrize("spent", [0, 1])
async def test_a_take_resent_after_its_return_takes_nothing(
    api: httpx.AsyncClient, redis: Redis, spent: int
) -> None:
    """The outside review's case: a take whose answer was late, resent after the client
    returned the lease.  Returned with nothing held, the lease's record is gone; its kept
    answer still says it was returned, so the copy holds nothing nobody would return."""
    per_day = {"name": "per-day", "limit": 1000, "per": "day", "algorithm": "fixed_window"}
    customer, auth = await customer_on(api, plan_with(quota=100, rate_limits=[per_day]))
    take = {"want": 20, "lease": new_lease_id(), "term": 1}
    assert (await lease(api, auth, **take)).json()["granted"] == 12
    back = await give_back(api, auth, lease=take["lease"], spent=spent, term=1)
    assert back.status_code == 200 and back.json()["returned"] == 12 - spent
    late = await lease(api, auth, **take)
    assert late.status_code == 404, late.text
    assert late.json()["type"].endswith("/unknown-lease")
    assert await usage_and_held(redis, customer) == (0, spent * VALUE_SCALE)
    limits = (await api.get(f"/v1/customers/{customer}/limits", headers=auth)).json()
    rate = next(p for p in limits["limits"] if p["kind"] == "rate")
    assert rate["used"] == spent, rate  # the unspent tokens came back


async def numbered_take(
    redis: Redis, leaser: Leaser, customer: str, at_ms: int | None = None
) -> tuple[LeaseAsk, Grant]:
    """A customer with 100 calls of quota, and term 1 of a lease taken under our own id."""
    await put_account(redis, customer, quota=100)
    take = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, 100, term=1)
    return take, await leaser.ask(customer, take, utcnow(), None if at_ms is None else at_ms * 1000)


async def test_a_resent_take_gets_the_time_its_term_has_left(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    customer, at_ms = f"{tenant}-left", int(utcnow().timestamp() * 1000)
    take, first = await numbered_take(redis, leaser, customer, at_ms)
    again = await leaser.ask(customer, take, utcnow(), (at_ms + 500) * 1000)
    assert (
        (first.granted, first.expires_ms)
        == (again.granted, again.expires_ms)
        == (12, at_ms + TTL_MS)
    )
    assert (first.expires_in_ms, again.expires_in_ms) == (TTL_MS, TTL_MS - 500)
    assert await usage_and_held(redis, customer) == (0, 12 * VALUE_SCALE)


async def test_a_resent_renewal_after_a_newer_term_is_a_renewal_of_that_term(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    """Only the same term number is a resend: the next number is the next renewal."""
    customer = f"{tenant}-terms"
    take, first = await numbered_take(redis, leaser, customer)
    assert first.granted == 12
    ident = take.lease
    second = LeaseAsk(ident, LeaseMode.RENEW, METER, 100, spent=12, term=2)
    assert (await leaser.ask(customer, second, utcnow())).granted == 11  # 88 left
    third = LeaseAsk(ident, LeaseMode.RENEW, METER, 100, spent=11, term=3)
    assert (await leaser.ask(customer, third, utcnow())).granted == 9  # 77 left
    assert (await leaser.ask(customer, third, utcnow())).granted == 9  # the same answer
    assert await usage_and_held(redis, customer) == (0, 32 * VALUE_SCALE)


async def test_without_redis_no_lease_is_granted(settings: Settings) -> None:
    async with running_api(settings, redis_url="redis://127.0.0.1:1/0") as api:
        reply = await lease(api, {"Authorization": "Bearer test-token"}, want=5, customer="c1")
    assert reply.status_code == 503, reply.text
    assert reply.json()["type"].endswith("/enforcement-unavailable")
    assert reply.headers["Retry-After"] == "1"


async def test_a_lease_renewed_after_its_deadline_is_released_once(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    """Renewing a lease whose deadline passed (not yet swept) returns its grant once: the
    expiry sweep in the same call must not release it a second time."""
    customer = f"{tenant}-late"
    await put_account(redis, customer, quota=100)
    start = int(utcnow().timestamp() * 1000)
    take = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, 100)
    assert (await leaser.ask(customer, take, utcnow(), start * 1000)).granted == 12
    late = (start + TTL_MS + SETTLE_MS + 5) * 1000
    renew = LeaseAsk(take.lease, LeaseMode.RENEW, METER, 100, spent=0)
    grant = await leaser.ask(customer, renew, utcnow(), late)
    assert grant.freed == 12 and grant.granted == 12
    assert await usage_and_held(redis, customer) == (0, 12 * VALUE_SCALE)


async def test_an_unnumbered_renewal_of_a_returned_lease_renews_it_as_before(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    """Only numbered requests close a returned lease; clients that do not number their
    requests keep the behaviour they were written for."""
    customer = f"{tenant}-unnumbered"
    await put_account(redis, customer, quota=100)
    take = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, 100)
    assert (await leaser.ask(customer, take, utcnow())).granted == 12
    back = await leaser.ask(customer, LeaseAsk(take.lease, LeaseMode.RETURN, spent=2), utcnow())
    assert back.outcome.code is Code.RETURNED and back.held == 2
    again = LeaseAsk(take.lease, LeaseMode.RENEW, METER, 100, spent=0)
    assert (await leaser.ask(customer, again, utcnow())).granted == 12  # 98 left
    assert await usage_and_held(redis, customer) == (0, 14 * VALUE_SCALE)


@pytest.mark.parametrize("path", ["/v1/leases", "/v1/leases/return", "/v1/enforce"])
async def test_a_body_past_a_mebibyte_is_refused_before_it_is_read_whole(
    api: httpx.AsyncClient, path: str
) -> None:
    """413, with or without a key, declared or chunked: no one makes a decision route
    read and parse megabytes (ingest has its own, larger bound)."""
    big = b'{"want": 1, "endpoint": "' + b"a" * (1 << 20) + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 65_536):
            yield big[start : start + 65_536]

    json_type = {"Content-Type": "application/json"}
    for content in (big, chunked()):
        reply = await api.post(path, content=content, headers=json_type)
        assert reply.status_code == 413, reply.text
        assert reply.headers["content-type"] == "application/problem+json"
        assert reply.json()["type"].endswith("/payload-too-large")
