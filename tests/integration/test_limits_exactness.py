"""The limits status counts exactly as enforcement does.

``limits.lua`` reads the state ``enforce.lua`` writes but does its own arithmetic, so
here the two run side by side in the real Redis, with the clock overridden: whatever
calls came before, the status's ``remaining`` is the number of calls of cost 1 the
enforcement script then admits at that instant, and ``reset`` the moment the policy is
full again; a quota's ``held`` is what the next decision counts, expired reservations
included or not as that decision will have them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import account_state, redis_keys
from schemas.account_state import compile_inline
from schemas.events import utcnow
from schemas.plans import Algorithm, Per, RateLimit
from services.api.enforcement.limiter import Ask, Limiter, Mode
from services.api.enforcement.pipelined import Pipelined
from services.api.enforcement.status import LimitsReader, PolicyState
from services.common.settings import Settings
from tests.accounts_support import customer_on, plan_with, running_api
from tests.conftest import REDIS_URL
from tests.integration.test_enforcement import set_usage

START_MS = 1_790_000_000_000
COSTS = {"/two": 2, "/three": 3}
LIMITS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20]

policies = st.builds(
    RateLimit,
    name=st.just("p"),
    limit=st.sampled_from(LIMITS),
    per=st.sampled_from([Per.SECOND, Per.MINUTE]),
    burst=st.none() | st.integers(1, 40),
    algorithm=st.sampled_from(list(Algorithm)),
)
pauses = st.integers(0, 3000) | st.sampled_from([0, 1, 2, 999, 1000, 6000, 59_999])
steps = st.lists(st.tuples(pauses, st.sampled_from(["", *COSTS])), min_size=0, max_size=30)


def capacity(policy: RateLimit) -> int:
    bucket = policy.algorithm in (Algorithm.TOKEN_BUCKET, Algorithm.GCRA)
    return policy.capacity if bucket else policy.limit


async def _project(redis: Redis, customer: str, policy: RateLimit) -> None:
    """The account hash as the accounts projection writes it, with this one policy."""
    await redis.hset(
        redis_keys.account(customer),
        mapping={
            account_state.PLAN: "p",
            account_state.STATUS: "active",
            account_state.TRIAL_ENDS: "",
            account_state.POLICIES: compile_inline((policy,), COSTS),
            account_state.PAST_DUE_SINCE: "",
        },
    )


async def _replay(database_url: str, policy: RateLimit, calls: list[tuple[int, str]]) -> None:
    connection, redis = Pipelined(REDIS_URL, 5.0), Redis.from_url(REDIS_URL)
    pool = AsyncConnectionPool(database_url, open=False)  # never opened: no quotas here
    customer = f"prop-{uuid.uuid4().hex}"
    try:
        await _project(redis, customer, policy)
        limiter, reader = Limiter(connection, 1000), LimitsReader(Settings(), redis, pool)
        now = START_MS + uuid.uuid4().int % 60_000

        async def status(at: int) -> PolicyState:
            (found,) = (await reader.read(customer, utcnow(), at * 1000)).limits
            return found

        async def admitted(at: int, endpoint: str = "") -> bool:
            ask = Ask(meter="api_calls", endpoint=endpoint)
            return (await limiter.decide(customer, ask, utcnow(), at * 1000)).allowed

        for pause, endpoint in calls:
            now += pause
            await admitted(now, endpoint)
        seen = await status(now)
        full = capacity(policy)
        assert seen.used == full - seen.remaining, (policy, seen)
        if policy.algorithm is Algorithm.SLIDING_WINDOW:
            assert seen.reset_ms == seen.window_ms - now % seen.window_ms
        else:
            assert (await status(now + seen.reset_ms)).remaining == full, (policy, seen)
            if seen.remaining < full:
                assert (await status(now + seen.reset_ms - 1)).remaining < full, (policy, seen)
        taken = 0
        while taken <= full and await admitted(now):
            taken += 1
        assert taken == seen.remaining, (policy, calls, seen, taken)
    finally:
        await redis.delete(redis_keys.account(customer), redis_keys.rate_states(customer))
        await redis.aclose()
        await connection.aclose()


@settings(max_examples=150, deadline=None)
@given(policy=policies, calls=steps)
def test_remaining_is_what_enforcement_admits(
    database_url: str, policy: RateLimit, calls: list[tuple[int, str]]
) -> None:
    asyncio.run(_replay(database_url, policy, calls))


@dataclass
class SideBySide:
    """One customer's quota as the status reads it and as a decision (a peek) finds it,
    at a given instant (µs): the two run in the same Redis."""

    customer: str
    reader: LimitsReader
    limiter: Limiter

    async def quota(self, at: int) -> PolicyState:
        limits = (await self.reader.read(self.customer, utcnow(), at)).limits
        (found,) = [p for p in limits if p.meter]
        return found

    async def admits(self, quantity: int, at: int) -> bool:
        ask = Ask(meter="api_calls", quantity=Decimal(quantity), mode=Mode.PEEK)
        return (await self.limiter.decide(self.customer, ask, utcnow(), at)).allowed


@asynccontextmanager
async def side_by_side(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool, customer: str
) -> AsyncIterator[SideBySide]:
    connection = Pipelined(REDIS_URL, 5.0)
    try:
        yield SideBySide(customer, LimitsReader(settings, redis, pool), Limiter(connection, 1000))
    finally:
        await connection.aclose()


async def test_held_is_what_the_next_decision_counts(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool
) -> None:
    """150 reservations, all expired: a decision releases at most 100 of them before it
    counts what is held, and the status counts the 50 left as that decision will."""
    async with running_api(settings) as api:
        customer, key = await customer_on(api, plan_with(quota=500))
        await set_usage(redis, customer, 100)
        replies = await asyncio.gather(*(_reserve(api, key, f"r{i}") for i in range(150)))
        assert {r.status_code for r in replies} == {200}
    seconds, micros = await redis.time()
    later = (seconds + settings.reservation_ttl_seconds + 1) * 1_000_000 + micros
    async with side_by_side(settings, redis, pool, customer) as both:
        first = await both.quota(later)
        assert (first.used, first.held, first.remaining) == (
            Decimal(100),
            Decimal(50),
            Decimal(350),
        )
        assert await both.quota(later) == first  # reading released nothing
        assert not await both.admits(351, later)  # that decision released 100 of them
        second = await both.quota(later)
        assert (second.held, second.remaining) == (Decimal(0), Decimal(400))
        assert not await both.admits(401, later)
        assert await both.admits(400, later)


async def _reserve(api: httpx.AsyncClient, key: dict[str, str], event: str) -> httpx.Response:
    body = {"mode": "reserve", "event": {"source": "exact", "id": event}}
    return await api.post("/v1/enforce", json=body, headers=key)


async def test_an_expired_lease_is_counted_out_as_the_next_decision_will(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool
) -> None:
    """A lease's value holds more than a reservation's (``meter|held|grant|end``): read
    past its settle window, what it held is counted out, as enforcement releases it."""
    async with running_api(settings) as api:
        customer, key = await customer_on(api, plan_with(quota=100))
        taken = await api.post("/v1/leases", json={"meter": "api_calls", "want": 50}, headers=key)
        assert taken.status_code == 200, taken.text
        granted = taken.json()["granted"]
    seconds, micros = await redis.time()
    now = seconds * 1_000_000 + micros
    later = now + (taken.json()["ttl_ms"] // 1000 + settings.reservation_ttl_seconds + 1) * 10**6
    async with side_by_side(settings, redis, pool, customer) as both:
        held = await both.quota(now)
        assert (held.held, held.remaining) == (Decimal(granted), Decimal(100 - granted))
        expired = await both.quota(later)
        assert (expired.used, expired.held, expired.remaining) == (
            Decimal(0),
            Decimal(0),
            Decimal(100),
        )
        assert not await both.admits(101, later)
        assert await both.admits(100, later)
