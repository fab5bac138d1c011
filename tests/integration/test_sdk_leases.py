"""``LeaseDecider`` over real sockets against the scripted stand-in Tally of
``tests.sdk_fake`` (``LeaseModel`` grants as ``lease.lua`` does): concurrent callers
share one lease request, calls are admitted locally, what is reported spent is what was
admitted, refusals are cached, and the fallbacks.  Against a real Tally in
``tests/e2e/test_sdk_leases.py``."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tally_sdk import (
    Ask,
    AuthenticationError,
    LeaseDecider,
    RouteTemplates,
    Tally,
    TallyMiddleware,
    raw_path,
)

from tests.integration.test_sdk_events import hello, serve_requests, shut_down
from tests.sdk_fake import LEASE_ANSWER, Answer, LeaseModel, Seen, allow_all, fake_tally, reply


def ask(n: int, key: str = "k", endpoint: str = "/e") -> Ask:
    return Ask(key, "api_calls", endpoint, f"ev{n}")


def lease_requests(seen: list[Seen]) -> list[dict[str, Any]]:
    return [s.json() for s in seen if s.path == "/v1/leases"]


async def test_concurrent_calls_share_one_lease_request_and_spend_locally() -> None:
    model = LeaseModel(room=10_000)
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        first = await asyncio.gather(*(decider.decide(ask(n)) for n in range(200)))
        assert all(d.allowed and d.lease is not None for d in first)
        assert len(lease_requests(fake.seen)) == 1  # 200 waiters, one request
        assert lease_requests(fake.seen)[0]["want"] == 200  # waiting calls: no lookahead yet
        before = len(fake.seen)
        more = [await decider.decide(ask(n)) for n in range(30)]
        # One by one: the lookahead doubles (1, 2, 4, 8, 16) while grants come back full.
        assert all(d.allowed for d in more) and len(fake.seen) - before == 5
        await decider.aclose()
    assert model.total_spent == 230  # spent reported over renewals and returns
    assert sum(model.grants.values()) == 0 and model.room == 10_000 - 230


async def test_calls_past_a_quota_are_refused_and_served_equals_spent() -> None:
    model = LeaseModel(room=100)
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        decisions = await asyncio.gather(*(decider.decide(ask(n)) for n in range(500)))
        served = sum(d.allowed for d in decisions)
        refused = [d for d in decisions if not d.allowed]
        assert served == 100 and len(refused) == 400
        assert {d.status for d in refused} == {429}
        assert refused[0].headers["Retry-After"] == "1" and "RateLimit" in refused[0].headers
        assert refused[0].problem is not None and refused[0].problem["status"] == 429
        asked = len(fake.seen)
        again = await decider.decide(ask(501))
        assert not again.allowed and len(fake.seen) == asked  # cached until Retry-After
        await decider.aclose()
    assert model.total_spent == 100 and model.room == 0


async def test_decide_now_admits_only_from_what_is_held_and_counts_like_decide() -> None:
    model = LeaseModel(room=10)
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        assert decider.decide_now("k", "api_calls", "/e") is None  # nothing held yet
        assert len(fake.seen) == 0  # and asking settles nothing by itself
        decisions = [await decider.decide(ask(0))]
        while len(decisions) < 15:
            now = decider.decide_now("k", "api_calls", "/e")
            decisions.append(now if now is not None else await decider.decide(ask(99)))
        assert sum(d.allowed for d in decisions) == 10
        assert [d.status for d in decisions[10:]] == [429] * 5
        refused = decider.decide_now("k", "api_calls", "/e")  # the cached refusal
        assert refused is not None and not refused.allowed
        await decider.aclose()
    assert model.total_spent == 10 and model.room == 0


async def test_refusal_cache_ends_at_retry_after_and_units_come_back() -> None:
    model = LeaseModel(room=0)
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        assert (await decider.decide(ask(0))).status == 429
        model.room = 5  # units given back elsewhere
        assert (await decider.decide(ask(1))).status == 429  # still within Retry-After
        await asyncio.sleep(1.05)
        assert (await decider.decide(ask(2))).allowed
        assert len(lease_requests(fake.seen)) == 2
        await decider.aclose()
    assert model.total_spent == 1 and model.room == 4


async def test_an_ended_lease_is_taken_afresh() -> None:
    model = LeaseModel(room=1_000, ttl_ms=300)
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        first = await decider.decide(ask(0))
        await asyncio.sleep(0.35)  # the term is over: nothing more is admitted from it
        model.grants.clear()  # and Tally forgot the lease (ended and settled)
        second = await decider.decide(ask(1))
        assert second.allowed and second.lease != first.lease
        asked = [(r.get("lease"), r.get("term")) for r in lease_requests(fake.seen)][-2:]
        assert asked == [(first.lease, 2), (second.lease, 1)]  # the renewal, then a take
        await decider.aclose()


async def test_a_slot_whose_terms_end_unspent_asks_for_fewer() -> None:
    """Calls further apart than a term: each term ends with its lookahead unspent, whose
    rate-limit tokens sit idle in Tally until returned, so the lookahead halves instead
    of doubling (an outside review saw it grow to an eighth of a plan's minute)."""
    model = LeaseModel(room=10_000)
    now = [0.0]
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally, clock=lambda: now[0])
        for n in range(8):
            assert (await decider.decide(ask(n))).allowed
            now[0] += 2.5  # past the term's 2 s, within the slot's 5 s idle
        wants = [r["want"] for r in lease_requests(fake.seen)]
        await decider.aclose()
    assert wants[0] == 1 and len(wants) == 8 and max(wants) == 2, wants
    assert model.total_spent == 8


async def test_a_lease_request_resent_after_a_dropped_answer_is_granted_once() -> None:
    """The connection closes after Tally granted, before its answer: the client sends
    the request again, the same lease and term, and gets the same grant back."""
    model = LeaseModel(room=100)
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        assert (await decider.decide(ask(0))).allowed  # a connection to reuse
        await asyncio.sleep(2.1)  # the term is over
        model.drop = 1
        later = await decider.decide(ask(1))
        assert later.allowed
        first, resent = lease_requests(fake.seen)[-2:]
        assert first == resent and first["term"] == 2
        assert model.spent == {later.lease: 1}  # the first term settled once, not twice
        assert model.room + sum(model.grants.values()) + model.total_spent == 100
        await decider.aclose()


async def test_without_leases_decisions_fall_back_to_enforce() -> None:
    async def no_redis_for_leases(seen: Seen) -> Answer | None:
        if seen.path == "/v1/leases":
            return reply(503, {"type": "enforcement-unavailable"}, {"Retry-After": "1"})
        return await allow_all(seen)

    async with fake_tally(no_redis_for_leases) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        decisions = await asyncio.gather(*(decider.decide(ask(n)) for n in range(5)))
        assert all(d.allowed and d.lease is None for d in decisions)
        paths = [s.path for s in fake.seen]
        assert paths.count("/v1/leases") == 1 and paths.count("/v1/enforce") == 5


async def test_an_older_tally_without_leases_is_asked_per_request() -> None:
    async def no_route(seen: Seen) -> Answer | None:
        if seen.path.startswith("/v1/leases"):
            return reply(404, {"detail": "Not Found"})
        return await allow_all(seen)

    async with fake_tally(no_route) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally)
        for n in range(3):
            assert (await decider.decide(ask(n))).allowed
        assert [s.path for s in fake.seen] == ["/v1/leases"] + ["/v1/enforce"] * 3


async def test_a_key_tally_refuses_is_not_asked_about_again_within_the_ttl() -> None:
    """A client calling in a loop with a revoked key costs Tally one lease request per
    lease ttl, not one per call; each call still gets the 401 and its problem, and other
    keys are asked about as usual."""
    problem = {
        "type": "https://tally.dev/problems/unauthorized",
        "status": 401,
        "detail": "revoked",
    }
    model = LeaseModel(room=1_000)

    async def dead_key(seen: Seen) -> Answer | None:
        if seen.path == "/v1/leases" and seen.headers["authorization"] == "Bearer dead":
            return reply(401, problem)
        return await model(seen)

    now = [100.0]
    async with fake_tally(dead_key) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally, clock=lambda: now[0])
        errors = []
        for n in range(20):
            with pytest.raises(AuthenticationError) as refused:
                await decider.decide(ask(n, key="dead"))
            assert refused.value.status == 401 and refused.value.problem == problem
            errors.append(refused.value)
            now[0] += 0.05  # 20 calls within 1 s, inside the 2-s ttl
        assert len({id(e) for e in errors}) == 20  # each its own, not one raised again
        assert (await decider.decide(ask(20, key="alive"))).allowed
        dead = [s for s in fake.seen if s.headers["authorization"] == "Bearer dead"]
        assert len(dead) == 1
        now[0] += 2.0  # the ttl is over: Tally is asked again
        with pytest.raises(AuthenticationError):
            await decider.decide(ask(21, key="dead"))
        dead = [s for s in fake.seen if s.headers["authorization"] == "Bearer dead"]
        assert len(dead) == 2
        await decider.aclose()


async def test_a_renewal_refused_for_its_key_is_returned_by_the_service() -> None:
    """Tally refuses a revoked key's renewal without touching the lease: the term's
    unspent units go back with the slot's other terms when it idles, under the service
    token, instead of staying held until Tally's settle window."""
    model = LeaseModel(room=100, ttl_ms=300)
    revoked = False

    async def revoking(seen: Seen) -> Answer | None:
        if revoked and seen.path == "/v1/leases":
            return reply(401, {"type": "https://tally.dev/problems/unauthorized", "status": 401})
        return await model(seen)

    async with fake_tally(revoking) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally, idle=0.2)
        assert (await decider.decide(ask(0))).allowed
        revoked = True
        await asyncio.sleep(0.35)  # the term is over: the next call renews it
        with pytest.raises(AuthenticationError):
            await decider.decide(ask(1))
        await asyncio.sleep(1.0)  # idle: what the slot held is returned
        assert sum(model.grants.values()) == 0 and model.total_spent == 1
        assert any(s.path == "/v1/leases/return" for s in fake.seen)
        await decider.aclose()


async def test_middleware_tags_events_and_returns_leases_on_shutdown() -> None:
    model = LeaseModel(room=1_000)
    async with fake_tally(model) as fake:
        tally = Tally(fake.url, "svc", max_delay=0.05)
        app = TallyMiddleware(hello, tally=tally)
        assert await serve_requests(app, 20) == [200] * 20
        assert await shut_down(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        await tally.aclose()
    sent = [e for s in fake.seen if s.path == "/v1/events" for e in s.json()]
    assert len(sent) == 20 and {e["tallylease"] for e in sent} <= set(model.grants)
    assert model.total_spent == 20 and sum(model.grants.values()) == 0
    assert model.returned  # the shutdown gave back what was left


async def test_idle_leases_are_returned_and_memory_is_bounded() -> None:
    model = LeaseModel(room=10_000)
    async with fake_tally(model) as fake, Tally(fake.url, "svc") as tally:
        decider = LeaseDecider(tally, max_slots=3, idle=0.2)
        for n in range(6):  # six slots, at most three kept
            assert (await decider.decide(ask(n, endpoint=f"/e{n}"))).allowed
        await asyncio.sleep(0.05)
        assert len(model.returned) >= 3  # the three least recently used were returned
        await asyncio.sleep(1.5)  # idle: the rest too
        assert sum(model.grants.values()) == 0 and model.total_spent == 6
        await decider.aclose()


async def test_unreachable_tally_fails_as_the_middleware_is_told() -> None:
    async with fake_tally(lambda seen: _never(seen)) as fake:
        url = fake.url
    for fail_open, status in ((False, 503), (True, 200)):
        tally = Tally(url, "svc", close_timeout=0.1)
        app = TallyMiddleware(hello, tally=tally, fail_open=fail_open)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answer = await client.get("/r", headers={"X-API-Key": "k"})
        assert answer.status_code == status
        await tally.aclose()


async def _never(seen: Seen) -> Answer | None:
    return None


@pytest.mark.parametrize(("fail_open", "after"), [(False, 503), (True, 200)])
async def test_a_held_lease_serves_while_tally_is_away_then_the_setting_decides(
    fail_open: bool, after: int
) -> None:
    """Tally goes away with a term held: its calls are still admitted from it, and once
    it has run out the middleware answers as it is told (503 problem, or unmetered)."""
    away = False

    async def script(seen: Seen) -> Answer | None:
        if away:
            return None  # the connection drops unanswered: Tally is unreachable
        if seen.path == "/v1/leases":
            term = LEASE_ANSWER | {"lease": "ls_fake000000000001", "granted": 50}
            return reply(200, term | {"ttl_ms": 1000})
        return await allow_all(seen)

    async with fake_tally(script) as fake:
        tally = Tally(fake.url, "svc", close_timeout=0.1)
        app = TallyMiddleware(hello, tally=tally, fail_open=fail_open)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:

            async def call() -> httpx.Response:
                return await client.get("/r", headers={"X-API-Key": "k"})

            assert [(await call()).status_code for _ in range(10)] == [200] * 10
            away = True
            held = [(await call()).status_code for _ in range(10)]  # 20 of 50 spent
            await asyncio.sleep(1.1)  # the term is over
            ended = await call()
        await tally.aclose()
    assert held == [200] * 10
    assert ended.status_code == after
    if not fail_open:
        assert ended.headers["content-type"] == "application/problem+json"


def items_api() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/v1/geocode")
    async def geocode() -> dict[str, str]:
        return {"city": "Berlin"}

    return app


async def test_a_fastapi_app_is_leased_and_metered_by_route_not_by_id() -> None:
    """``/v1/items/1`` … ``/v1/items/30`` are one endpoint, ``/v1/items/{item_id}``: one
    lease for all of them, not a lease request per id; a path no route matches, and any
    app that is not Starlette's, keep their raw path."""
    model = LeaseModel(room=1_000)
    async with fake_tally(model) as fake:
        tally = Tally(fake.url, "svc", max_delay=0.05)
        app = items_api()
        app.add_middleware(TallyMiddleware, tally=tally)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            key = {"X-API-Key": "k"}
            answers = [await client.get(f"/v1/items/{n}", headers=key) for n in range(30)]
            assert [a.status_code for a in answers] == [200] * 30
            assert (await client.post("/v1/items/7", headers=key)).status_code == 405
            assert (await client.get("/v1/geocode", headers=key)).status_code == 200
            assert (await client.get("/nowhere/42", headers=key)).status_code == 404
        await tally.flush()
        asked = [r["endpoint"] for r in lease_requests(fake.seen) if r["term"] == 1]
        assert sorted(asked) == ["/nowhere/42", "/v1/geocode", "/v1/items/{item_id}"]
        await tally.aclose()
    sent = [e["data"] for s in fake.seen if s.path == "/v1/events" for e in s.json()]
    by_endpoint = Counter((d["endpoint"], d["method"], d["status"]) for d in sent)
    assert by_endpoint == {
        ("/v1/items/{item_id}", "GET", 200): 30,
        ("/v1/items/{item_id}", "POST", 405): 1,
        ("/v1/geocode", "GET", 200): 1,
        ("/nowhere/42", "GET", 404): 1,
    }


def test_route_templates_remember_at_most_their_bound_and_stay_right() -> None:
    """Past the bound they forget and start again; the names stay right either way."""
    app = items_api()
    templates = RouteTemplates(max_remembered=2)
    paths = [f"/v1/items/{n}" for n in range(5)] + ["/v1/geocode", "/v1/items/x/y"]
    for _ in range(2):
        named = [templates({"type": "http", "method": "GET", "path": p, "app": app}) for p in paths]
        assert named == ["/v1/items/{item_id}"] * 5 + ["/v1/geocode", "/v1/items/x/y"]
    assert sum(len(paths) for paths in templates._known.values()) <= 2
    not_starlette = {"type": "http", "method": "GET", "path": "/v1/items/9"}  # no "app"
    assert templates(not_starlette) == "/v1/items/9"


def test_a_raw_path_is_named_as_tally_takes_an_endpoint() -> None:
    """Control characters (``%00`` arrives decoded) and length past a dimension's: Tally
    would refuse the lease's endpoint, or admit the call and refuse its event."""
    assert raw_path({"type": "http", "path": "/v1/a\x00b\x7f\x9fc"}) == "/v1/abc"
    assert raw_path({"type": "http", "path": "/" + "x" * 300}) == "/" + "x" * 255
    assert raw_path({"type": "http", "path": "/v1/géo code"}) == "/v1/géo code"


async def test_a_key_longer_than_any_tally_key_is_refused_in_the_app() -> None:
    """A megabyte key per request would be held as a lease's name and sent to Tally in
    each lease request: an outside review grew an app from 73 to 386 MB with 300."""
    async with fake_tally(LeaseModel(room=100)) as fake:
        tally = Tally(fake.url, "svc")
        app = TallyMiddleware(items_api(), tally=tally)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            too_long = await client.get("/v1/geocode", headers={"X-API-Key": "k" * 129})
            assert len(fake.seen) == 0
            longest = await client.get("/v1/geocode", headers={"X-API-Key": "k" * 128})
        await tally.aclose()
    assert too_long.status_code == 401 and too_long.headers["WWW-Authenticate"] == "Bearer"
    assert too_long.headers["content-type"] == "application/problem+json"
    assert "longer than 128 characters" in too_long.json()["detail"]
    assert longest.status_code == 200
