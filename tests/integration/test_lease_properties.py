"""Lease accounting against a naive model, and lease sizes against the rate-limit models.

The first property drives random sequences of take / spend / count / renew / return /
time passing through the real scripts (``lease.lua``, and the aggregator's sink for the
events) and checks, after every step, what exactness means: nothing is admitted beyond
the quota (spent ≤ limit, usage + held ≤ limit), nothing spent is forgotten (usage +
held ≥ spent while events arrive within the settle window), and once everything is
returned, counted and past its deadline, held is 0 and usage is exactly what was spent.

The second checks that a lease's grant is exactly what the rate limit has room for,
using the reference models of ``test_limiter_properties``: granted n fits, n + 1 would
not (unless the request wanted only n).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, utcnow
from schemas.plans import RateLimit
from services.api.enforcement.leaser import Grant, LeaseAsk, LeaseMode, Leaser, new_lease_id
from services.api.enforcement.limiter import Code
from services.api.enforcement.pipelined import Pipelined
from tests.conftest import REDIS_URL
from tests.integration.test_limiter_properties import START_MS, model, policies
from tests.lease_support import (
    METER,
    catalog_meters,
    count,
    put_account,
    spent_events,
    usage_and_held,
)

TTL_MS, SETTLE_MS, SHARE = 1000, 5000, 4
MAX_LEASES = 4
METERS = catalog_meters()

step = st.one_of(
    st.tuples(st.just("take"), st.integers(1, 40), st.just(0)),
    st.tuples(st.just("spend"), st.integers(0, MAX_LEASES - 1), st.integers(1, 12)),
    st.tuples(st.just("count"), st.integers(0, MAX_LEASES - 1), st.integers(1, 12)),
    st.tuples(st.just("renew"), st.integers(0, MAX_LEASES - 1), st.integers(1, 40)),
    st.tuples(st.just("return"), st.integers(0, MAX_LEASES - 1), st.just(0)),
    st.tuples(st.just("tick"), st.integers(0, 2500), st.just(0)),
)


@dataclass
class Held:
    """One lease as its holder sees it."""

    id: str
    left: int  # calls it may still admit in this term
    spent: int  # calls admitted in this term
    ends: int  # the term's end, ms
    deadline: int  # after it, what the lease still holds is released
    returned: bool = False
    pending: list[StoredEvent] = field(default_factory=list)  # spent, not yet counted


@dataclass
class World:
    leaser: Leaser
    redis: Redis
    customer: str
    limit: int
    now: int
    leases: list[Held] = field(default_factory=list)
    spent: int = 0

    async def ask(self, ask: LeaseAsk) -> Grant:
        return await self.leaser.ask(self.customer, ask, utcnow(), self.now * 1000)

    def lease(self, index: int) -> Held | None:
        return self.leases[index] if index < len(self.leases) else None

    async def room(self) -> int:
        """Calls the quota has room for now (expiries due may add more in the call)."""
        used, held = await usage_and_held(self.redis, self.customer)
        return (self.limit * VALUE_SCALE - used - held) // VALUE_SCALE

    async def take(self, want: int) -> None:
        ask = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, want)
        room = await self.room()
        self._granted(ask.lease, await self.ask(ask), want, room, None)

    async def renew(self, held: Held, want: int) -> None:
        room = await self.room() + held.left  # the term's unspent calls come back first
        grant = await self.ask(LeaseAsk(held.id, LeaseMode.RENEW, METER, want, held.spent))
        if grant.outcome.code is Code.LEASE_UNKNOWN:
            # only a lease returned with nothing held, or past its deadline, can be gone
            assert held.returned or self.now >= held.deadline
            self.leases.remove(held)
            return
        assert grant.freed == held.left
        self._granted(held.id, grant, want, room, held)

    def _granted(self, lease: str, grant: Grant, want: int, room: int, held: Held | None) -> None:
        """Refused only when the quota had no room; else at least what the sizing rule
        gives for the room seen before the call (expiries can only add to it)."""
        outcome = grant.outcome
        if outcome.code is Code.REFUSED:
            assert outcome.violated is not None and outcome.violated.kind == "quota"
            assert room == 0, f"refused with room for {room}"
            if held is not None:
                held.left, held.spent, held.ends = 0, 0, self.now
                held.deadline = self.now + SETTLE_MS
            return
        assert outcome.code is Code.OK and 1 <= grant.granted <= want
        sized = min(want, room, max(1, room // SHARE))
        assert grant.granted >= sized
        if not any(h.deadline <= self.now for h in self.leases):  # nothing due to expire
            assert grant.granted == sized
        if held is None:  # leases beyond MAX_LEASES are never touched again: they expire
            held = Held(lease, 0, 0, 0, 0)
            self.leases.append(held)
        held.left, held.spent, held.ends = grant.granted, 0, grant.expires_ms
        held.deadline, held.returned = grant.expires_ms + SETTLE_MS, False

    async def spend(self, held: Held, calls: int) -> None:
        if held.returned or self.now >= held.ends:
            return  # a holder admits nothing from a lease that ended
        calls = min(calls, held.left)
        held.left -= calls
        held.spent += calls
        self.spent += calls
        held.pending += spent_events(self.customer, held.id, calls)

    async def count(self, held: Held, events: int) -> None:
        counted, held.pending = held.pending[:events], held.pending[events:]
        if counted:
            await count(self.redis, self.customer, counted, METERS)

    async def give_back(self, held: Held) -> None:
        grant = await self.ask(LeaseAsk(held.id, LeaseMode.RETURN, spent=held.spent))
        if grant.outcome.code is Code.LEASE_UNKNOWN:
            assert held.returned or self.now >= held.deadline
        else:
            assert grant.outcome.code is Code.RETURNED and grant.freed == held.left
        held.left, held.spent, held.returned = 0, 0, True
        held.deadline = self.now + SETTLE_MS

    async def tick(self, ms: int) -> None:
        """Time passes; events arrive within the settle window (the deployment's promise)."""
        for held in self.leases:
            if held.deadline <= self.now + ms:
                await self.count(held, len(held.pending))
        self.now += ms

    async def check(self) -> None:
        used, held = await usage_and_held(self.redis, self.customer)
        limit = self.limit * VALUE_SCALE
        assert self.spent <= self.limit, "admitted beyond the quota"
        assert used + held <= limit, (used, held)
        assert used + held >= self.spent * VALUE_SCALE, "spent units neither counted nor held"


async def _replay(limit: int, steps: list[tuple[str, int, int]]) -> None:
    connection = Pipelined(REDIS_URL, 5.0)
    redis = Redis.from_url(REDIS_URL)
    try:
        customer = f"lease-{uuid.uuid4().hex[:12]}"
        await put_account(redis, customer, quota=limit)
        world = World(
            Leaser(connection, TTL_MS, SETTLE_MS, SHARE),
            redis,
            customer,
            limit,
            int(utcnow().timestamp() * 1000),
        )
        for name, a, b in steps:
            held = world.lease(a)
            if name == "take":
                await world.take(a)
            elif name == "tick":
                await world.tick(a)
            elif held is None:
                continue
            elif name == "spend":
                await world.spend(held, b)
            elif name == "count":
                await world.count(held, b)
            elif name == "renew":
                await world.renew(held, b)
            else:
                await world.give_back(held)
            await world.check()
        # Everything settles: holders return, events arrive, deadlines pass.
        for held in world.leases:
            if not held.returned:
                await world.give_back(held)
        await world.tick(TTL_MS + SETTLE_MS + 1)
        for held in world.leases:
            assert not held.pending
        await world.take(1)  # any decision on the quota releases what expired
        for held in world.leases[-1:]:
            if not held.returned:
                await world.give_back(held)
        used, held_total = await usage_and_held(redis, customer)
        assert held_total == 0
        assert used == world.spent * VALUE_SCALE
    finally:
        await redis.aclose()
        await connection.aclose()


@settings(max_examples=120, deadline=None)
@given(limit=st.integers(0, 60), steps=st.lists(step, max_size=30))
def test_lease_accounting_matches_the_model(limit: int, steps: list[tuple[str, int, int]]) -> None:
    asyncio.run(_replay(limit, steps))


async def _rates(policy: RateLimit, asks: list[tuple[int, int]]) -> None:
    connection = Pipelined(REDIS_URL, 5.0)
    redis = Redis.from_url(REDIS_URL)
    try:
        customer = f"lease-{uuid.uuid4().hex[:12]}"
        await put_account(redis, customer, rates=(policy,), costs={"/call": 1})
        leaser = Leaser(connection, TTL_MS, SETTLE_MS, 1)  # share 1: the grant is the room
        now = START_MS + int(uuid.uuid4().int % 60_000)
        reference = model(policy, now)
        for advance, want in asks:
            now += advance
            ask = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, want, endpoint="/call")
            grant = await leaser.ask(customer, ask, utcnow(), now * 1000)
            granted = grant.granted if grant.outcome.allowed else 0
            if granted:
                assert reference.admit(now, granted), (policy, now, granted)
            if granted < want:
                assert not reference.admit(now, granted + 1, commit=False), (policy, now, granted)
    finally:
        await redis.aclose()
        await connection.aclose()


@settings(max_examples=150, deadline=None)
@given(
    policy=policies,
    asks=st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 50)), min_size=1, max_size=30),
)
def test_a_grant_is_exactly_the_rate_limits_room(
    policy: RateLimit, asks: list[tuple[int, int]]
) -> None:
    asyncio.run(_rates(policy, asks))
