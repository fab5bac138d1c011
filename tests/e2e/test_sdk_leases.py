"""``TallyMiddleware`` deciding from leases (its default) against a real `tally up`:
exact quotas across two app processes, rate limits, and how soon a plan change or a
revoked key reaches a process holding a lease (the lease ttl, 2 s by default)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from tally_sdk import LeaseDecider, Tally, TallyMiddleware
from tally_sdk.decider import Ask
from tally_sdk.errors import AuthenticationError
from tally_sdk.middleware import header

from bench.edge import start_app
from bench.edge_app import api
from schemas import redis_keys
from schemas.events import VALUE_SCALE
from services.common.broker import free_port
from services.common.settings import Settings
from tests.accounts_support import ADMIN, plan_with
from tests.conftest import env_for
from tests.support import TallyProcess, wait_for

pytestmark = pytest.mark.slow
TOKEN = "test-token"  # the service token of the `module_settings` fixture
TTL = 2.0  # seconds: TALLY_LEASE_TTL_MS's default
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def up(
    module_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TallyProcess]:
    env = env_for(module_settings) | {
        "TALLY_ADMIN_TOKEN": ADMIN["Authorization"].removeprefix("Bearer "),
        "TALLY_IP_LIMIT_PER_SECOND": "0",
    }
    log = tmp_path_factory.mktemp("up") / "up.log"
    process = TallyProcess(["up"], env, log).start()
    yield process
    process.stop()


@pytest.fixture
async def tally(up: TallyProcess) -> AsyncIterator[Tally]:
    async with Tally(up.url, TOKEN, source=f"lease-test-{uuid.uuid4().hex[:8]}") as client:
        yield client


def customer_on(url: str, plan: dict[str, Any]) -> tuple[str, str, str]:
    """Save ``plan``, create a customer on it: its id, its key and the key's id."""
    saved = httpx.put(f"{url}/v1/admin/plans/{plan['id']}", json=plan, headers=ADMIN)
    assert saved.status_code in (200, 201), saved.text
    made = httpx.post(
        f"{url}/v1/admin/customers",
        json={"email": f"{uuid.uuid4().hex[:10]}@example.com", "plan": plan["id"]},
        headers=ADMIN,
    )
    assert made.status_code == 201, made.text
    body = made.json()
    return body["customer"]["id"], body["api_key"]["key"], body["api_key"]["id"]


def in_process(tally: Tally) -> httpx.AsyncClient:
    app = TallyMiddleware(api(), tally=tally, exclude=("/readyz",))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app")


async def geocode(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/v1/geocode", json={"q": "berlin"}, headers={"X-API-Key": key})


def usage(url: str, customer: str) -> Decimal:
    answer = httpx.get(
        f"{url}/v1/customers/{customer}/usage",
        params={"meter": "api_calls", "window": "hour"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).json()
    return sum((Decimal(p["value"]) for p in answer.get("data", [])), Decimal(0))


async def held(redis: Redis, customer: str) -> int:
    return int(await redis.hget(redis_keys.held(customer), "api_calls") or 0)


async def test_500_calls_over_two_app_processes_against_100_left_serve_exactly_100(
    up: TallyProcess, redis: Redis, tmp_path: Path
) -> None:
    customer, key, _ = customer_on(up.url, plan_with(quota=100))
    extra = ["--kind", "tally", "--tally-url", up.url, "--token", TOKEN]
    ports = [free_port(), free_port()]
    apps = [start_app("tally", p, extra, tmp_path / f"app{p}.log") for p in ports]
    try:
        clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", timeout=30) for p in ports]
        answers = await asyncio.gather(*(geocode(clients[n % 2], key) for n in range(500)))
        for client in clients:
            await client.aclose()
    finally:
        for app in apps:  # SIGTERM: lifespan shutdown returns leases and flushes events
            app.terminate()
            app.wait(30)
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 100 and statuses.count(429) == 400
    for port_answers in (answers[0::2], answers[1::2]):
        refused = next(a for a in port_answers if a.status_code == 429)
        assert refused.headers["content-type"] == PROBLEM
        assert refused.json()["type"].endswith("/quota-exceeded")
        assert int(refused.headers["Retry-After"]) > 0
        assert "RateLimit" in refused.headers and "RateLimit-Policy" in refused.headers
    # The events of the 100 settle what the leases held: usage 100, nothing held.
    wait_for(lambda: usage(up.url, customer) == 100, 30, "usage of 100", up.tail)
    for _ in range(50):  # the last events' batch may still be on its way
        if await held(redis, customer) == 0:
            break
        await asyncio.sleep(0.2)
    assert await held(redis, customer) == 0


async def test_ten_a_minute_with_fifteen_rapid_calls_serves_ten(
    up: TallyProcess, tally: Tally
) -> None:
    _, key, _ = customer_on(up.url, plan_with(per_minute=10))
    async with in_process(tally) as client:
        answers = await asyncio.gather(*(geocode(client, key) for _ in range(15)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 10 + [429] * 5
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.headers["content-type"] == PROBLEM
        assert refused.json()["policy"] == "per-minute"
        assert refused.headers["RateLimit-Policy"].startswith('"per-minute";q=10;w=60')
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.headers["RateLimit"].startswith('"per-minute";r=0;t=')
    for served in (a for a in answers if a.status_code == 200):  # decided from a lease
        assert served.headers["RateLimit-Policy"].startswith('"per-minute";q=10;w=60')
        assert served.headers["RateLimit"].startswith('"per-minute";r=')
        assert "Retry-After" not in served.headers


async def test_calls_over_many_endpoints_get_all_a_rate_limit_allows(
    up: TallyProcess, tally: Tally
) -> None:
    """A lease per endpoint must not leave a plan's calls unserved: an outside review saw
    a customer of 100 a minute refused after 58 calls to as many paths (each lease took a
    spare token that never came back).  Served as ``/v1/enforce`` serves: 100 and what
    refilled meanwhile, then 429."""
    _, key, _ = customer_on(up.url, plan_with(per_minute=100))
    headers = {"X-API-Key": key}
    async with in_process(tally) as client:
        started = time.monotonic()
        spread = [await client.get(f"/v1/nowhere/{n}", headers=headers) for n in range(80)]
        rest = [await geocode(client, key) for _ in range(40)]
        refilled = (time.monotonic() - started) * 100 / 60
    assert [a.status_code for a in spread] == [404] * 80
    served = 80 + [a.status_code for a in rest].count(200)
    assert 100 <= served <= 100 + refilled + 1, (served, refilled)
    assert rest[-1].status_code == 429 and rest[-1].json()["policy"] == "per-minute"


async def test_a_downgrade_and_a_revoked_key_reach_a_lease_holder_within_its_ttl(
    up: TallyProcess, tally: Tally
) -> None:
    customer, key, key_id = customer_on(up.url, plan_with())
    small = plan_with(per_minute=2)
    async with in_process(tally) as client, httpx.AsyncClient(base_url=up.url) as admin:
        saved = await admin.put(f"/v1/admin/plans/{small['id']}", json=small, headers=ADMIN)
        assert saved.status_code in (200, 201), saved.text
        before = [(await geocode(client, key)).status_code for _ in range(20)]
        assert before == [200] * 20  # a lease is held now
        moved = await admin.patch(
            f"/v1/admin/customers/{customer}", json={"plan": small["id"]}, headers=ADMIN
        )
        assert moved.status_code == 200, moved.text
        await asyncio.sleep(TTL + 0.1)
        after = [await geocode(client, key) for _ in range(5)]
        assert [a.status_code for a in after] == [200, 200, 429, 429, 429]
        assert after[-1].headers["RateLimit-Policy"].startswith('"per-minute";q=2;w=60')

        revoked = await admin.delete(f"/v1/admin/customers/{customer}/keys/{key_id}", headers=ADMIN)
        assert revoked.status_code in (200, 204), revoked.text
        await asyncio.sleep(TTL + 0.1)
        answer = await geocode(client, key)
        assert answer.status_code == 401 and answer.headers["content-type"] == PROBLEM


async def test_bad_keys_from_one_caller_lock_out_that_caller_only(
    up: TallyProcess, tally: Tally
) -> None:
    """Tally counts failed keys per address; the middleware's lease requests name each
    request's caller (``X-Forwarded-For``, believed from the app's trusted host), so one
    caller guessing keys is refused alone, not every caller of the app's address."""
    _, key, _ = customer_on(up.url, plan_with())
    app = TallyMiddleware(api(), tally=tally, exclude=("/readyz",))

    def caller(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app, client=(address, 40_000))
        return httpx.AsyncClient(transport=transport, base_url="http://app")

    async with caller(somewhere()) as guesser, caller(somewhere()) as customer:
        guesses = [await geocode(guesser, f"tally_live_{uuid.uuid4().hex}") for _ in range(25)]
        assert [g.status_code for g in guesses] == [401] * 20 + [429] * 5
        assert guesses[-1].json()["policy"] == "auth-failures"
        refused = guesses[-1]
        assert refused.headers["content-type"] == PROBLEM and "Retry-After" in refused.headers
        # the guesser's address is refused even with a good key; that refusal is its
        # address's, not the key's: the key's other callers are served
        with_key = await geocode(guesser, key)
        assert with_key.status_code == 429 and with_key.json()["policy"] == "auth-failures"
        assert (await geocode(customer, key)).status_code == 200  # another caller: served


def somewhere() -> str:
    """An address of its own each run: Tally counts an address's failures a minute."""
    return f"2001:db8::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"


def geocoding(key: str, address: str) -> Ask:
    return Ask(key, "api_calls", "/v1/geocode", "", "reserve", address)


async def locked_out(tally: Tally) -> str:
    """An address Tally refuses whatever key it shows: twenty bad keys from it."""
    address, decider = somewhere(), LeaseDecider(tally)
    for _ in range(20):
        with pytest.raises(AuthenticationError):
            await decider.decide(geocoding(f"tally_live_{uuid.uuid4().hex}", address))
    await decider.aclose()
    return address


async def test_an_address_refused_in_a_lease_request_is_its_callers_refusal_only(
    up: TallyProcess, tally: Tally, redis: Redis
) -> None:
    """The review: a lease request names the first waiting caller's address.  Refused
    for that address, it was answered to every call waiting on the slot (another
    caller's included), and a renewal so refused was dropped, its unspent units held
    until the settle window."""
    customer, key, _ = customer_on(up.url, plan_with(quota=100))
    guesser, other = await locked_out(tally), somewhere()
    decider = LeaseDecider(tally)
    together = await asyncio.gather(
        decider.decide(geocoding(key, guesser)), decider.decide(geocoding(key, other))
    )
    assert [(d.status, d.policy) for d in together] == [(429, "auth-failures"), (200, None)]
    # the guesser is refused at once from then on, without a lease request
    assert decider.decide_now(key, "api_calls", "/v1/geocode", guesser) == together[0]
    assert decider.decide_now(key, "api_calls", "/v1/other", guesser) == together[0]
    await decider.aclose()

    decider = LeaseDecider(tally)
    assert (await decider.decide(geocoding(key, other))).allowed  # term 1: one call
    assert (await decider.decide(geocoding(key, other))).allowed  # term 2: two, one spent
    await asyncio.sleep(TTL + 0.1)  # term 2 ends with a call unspent
    refused = await decider.decide(geocoding(key, guesser))  # renews it: refused
    assert refused.status == 429 and refused.policy == "auth-failures"
    await decider.aclose()  # returns term 2: its unspent call is free at once
    # the three calls admitted (one above), awaiting their events; nothing else
    assert await held(redis, customer) == 3 * VALUE_SCALE


async def test_a_caller_cannot_turn_limits_off_by_what_its_request_carries(
    up: TallyProcess, tally: Tally
) -> None:
    """The outside review: behind a fail-open middleware, a request that made Tally answer
    422 — no end user for a plan counting per end user, or the service token sent as the
    caller's key — was served unmetered.  Such a request is the caller's error: it gets
    Tally's answer (or a 401), never the app; an end user with control characters is
    named without them, as Tally takes it."""
    per_user = {"name": "per-user", "limit": 3, "per": "minute", "scope": ["end_user"]}
    _, key, _ = customer_on(up.url, plan_with(rate_limits=[per_user]))
    app = TallyMiddleware(api(), tally=tally, end_user=header("x-user-id"), fail_open=True)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://app"
    ) as client:

        async def call(headers: dict[str, Any]) -> httpx.Response:
            return await client.post("/v1/geocode", json={"q": "x"}, headers=headers)

        nobody = [await call({"X-API-Key": key}) for _ in range(5)]
        assert {a.status_code for a in nobody} == {422}
        assert nobody[0].headers["content-type"] == PROBLEM
        assert nobody[0].json()["errors"][0]["field"] == "body.end_user"
        service = await call({"X-API-Key": TOKEN})
        assert service.status_code == 401 and service.headers["content-type"] == PROBLEM
        assert "WWW-Authenticate" in service.headers
        control = {"X-API-Key": key, "X-User-Id": b"a\x85b"}  # a C1 control, raw
        served = [(await call(control)).status_code for _ in range(4)]
        assert served == [200, 200, 200, 429]  # "ab"'s three calls a minute
        clean = await call({"X-API-Key": key, "X-User-Id": "ab"})
        assert clean.status_code == 429  # the same end user


async def test_names_an_app_builds_from_what_the_caller_wrote_are_cleaned(
    up: TallyProcess, tally: Tally
) -> None:
    """The review: an app's own ``endpoint`` or ``end_user`` may hand on what the caller
    wrote, lone surrogates or control characters included.  Tally cannot take them
    (no JSON carries a lone surrogate: a 400), and behind a fail-open middleware such
    calls were served unmetered; cleaned, they count like any other."""
    per_user = {"name": "per-user", "limit": 3, "per": "minute", "scope": ["end_user"]}
    _, key, _ = customer_on(up.url, plan_with(rate_limits=[per_user]))
    app = TallyMiddleware(
        api(),
        tally=tally,
        endpoint=lambda scope: scope["path"] + "\udc80",
        end_user=lambda scope: "c\ud800",
        fail_open=True,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://app"
    ) as client:
        served = [(await geocode(client, key)).status_code for _ in range(4)]
    assert served == [200, 200, 200, 429]  # "c"'s three calls a minute
