"""Leases that give back their unspent rate-limit tokens against the plain algorithm.

A renewal or return gives back what the term took and did not spend.  The promise
(docs/api.md) is two-sided: a customer served from leases is never admitted a call the
rate limit alone would have refused, and nothing it did not spend is lost while the
limit still counts it.  Random sequences of take / renew / return / time passing, with
random spending, run through the real ``lease.lua``; a twin — the reference model of
``test_limiter_properties`` — is fed only the calls spent, each at its term's grant, and
every term still open as if spent in full.  After every step the twin must admit all of
it, and what the limit has left (read without spending, as ``/limits`` reads it) is at
most what the twin has left — for a window, where nothing is forgotten, exactly that.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.events import utcnow
from schemas.plans import Algorithm, Per, RateLimit
from services.api.enforcement.leaser import Grant, LeaseAsk, LeaseMode, Leaser, new_lease_id
from services.api.enforcement.limiter import Code
from services.api.enforcement.pipelined import Pipelined
from services.api.enforcement.status import LimitsReader
from services.common.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.test_limiter_properties import START_MS, boundaries, model, policies
from tests.lease_support import METER, put_account

TTL_MS, SETTLE_MS, ENDPOINT = 1000, 600_000, "/call"
# Spending nothing, and pauses of whole windows, are where refunds and refill meet.
spent = st.just(0) | st.integers(0, 30)
pause = st.integers(0, 3000) | st.sampled_from(boundaries) | st.sampled_from([1000, 60_000])
which = st.integers(0, 2)  # which lease, modulo how many there are
Step = tuple[str, int, int]
step = st.one_of(
    st.tuples(st.just("take"), st.integers(1, 30), st.just(0)),
    st.tuples(st.just("renew"), which, spent),
    st.tuples(st.just("return"), which, spent),
    st.tuples(st.just("tick"), pause, st.just(0)),
)


@dataclass
class Term:
    """A term as its holder sees it: granted at ``at``, ``spent`` once reported."""

    at: int
    granted: int
    spent: int | None = None  # None: still open, counted as if all of it were spent


@dataclass
class Holder:
    lease: str
    terms: list[Term] = field(default_factory=list)
    gone: bool = False  # returned, refused for good, or forgotten by Tally

    @property
    def open(self) -> Term | None:
        term = self.terms[-1] if self.terms else None
        return term if term is not None and term.spent is None else None


class World:
    def __init__(
        self,
        connection: Pipelined,
        reader: LimitsReader,
        share: int,
        start: int,
        customer: str,
        policy: RateLimit,
        cost: int,
    ) -> None:
        self.leaser = Leaser(connection, TTL_MS, SETTLE_MS, share)
        self.reader = reader
        self.customer, self.policy, self.cost = customer, policy, cost
        self.start = self.now = start
        self.holders: list[Holder] = []

    async def ask(self, ask: LeaseAsk) -> Grant:
        return await self.leaser.ask(self.customer, ask, utcnow(), self.now * 1000)

    async def take(self, want: int) -> None:
        holder = Holder(new_lease_id())
        grant = await self.ask(LeaseAsk(holder.lease, LeaseMode.TAKE, METER, want, 0, ENDPOINT))
        if grant.outcome.code is Code.OK:
            holder.terms.append(Term(self.now, grant.granted))
            self.holders.append(holder)
        else:
            assert grant.outcome.code is Code.REFUSED, grant.outcome

    async def renew(self, holder: Holder, spent: int, want: int) -> None:
        term = holder.open
        spent = min(spent, term.granted) if term else 0
        ask = LeaseAsk(holder.lease, LeaseMode.RENEW, METER, max(want, 1), spent, ENDPOINT)
        grant = await self.ask(ask)
        if grant.outcome.code is Code.LEASE_UNKNOWN:
            holder.gone = True  # its open term, if any, stays counted in full
            return
        if term:
            term.spent = spent
        if grant.outcome.code is Code.OK:
            holder.terms.append(Term(self.now, grant.granted))
        else:
            assert grant.outcome.code is Code.REFUSED, grant.outcome

    async def give_back(self, holder: Holder, spent: int) -> None:
        term = holder.open
        spent = min(spent, term.granted) if term else 0
        grant = await self.ask(LeaseAsk(holder.lease, LeaseMode.RETURN, spent=spent))
        if grant.outcome.code is Code.RETURNED and term:
            term.spent = spent
        elif grant.outcome.code is not Code.RETURNED:
            assert grant.outcome.code is Code.LEASE_UNKNOWN, grant.outcome
        holder.gone = True

    def twin(self) -> int:
        """Replay every call spent (or still allowed) at its grant through the plain
        algorithm; all must be admitted.  What it has left now, in tokens."""
        reference = model(self.policy, self.start)
        spent = sorted(
            (term.at, term.granted if term.spent is None else term.spent)
            for holder in self.holders
            for term in holder.terms
        )
        for at, calls in spent:
            for _ in range(calls):
                assert reference.admit(at, self.cost), (self.policy, self.cost, at, spent)
        left = 0
        while left < 1000 and reference.admit(self.now, 1):
            left += 1
        return left

    async def check(self) -> None:
        """Never more room than the plain limit; for a window, exactly as much."""
        (state,) = (await self.reader.read(self.customer, utcnow(), self.now * 1000)).limits
        twin = self.twin()
        assert state.remaining <= twin, "a refund made room the limit would not have"
        if self.policy.algorithm in (Algorithm.FIXED_WINDOW, Algorithm.SLIDING_WINDOW):
            assert state.remaining == twin, "a window lost calls that were never spent"


async def _replay(
    database_url: str, policy: RateLimit, cost: int, share: int, into: int, steps: list[Step]
) -> None:
    """``into``: ms into the minute the first step happens (where windows begin matters)."""
    connection, redis = Pipelined(REDIS_URL, 5.0), Redis.from_url(REDIS_URL)
    pool = AsyncConnectionPool(database_url, open=False)  # never opened: no quotas here
    try:
        customer = f"refund-{uuid.uuid4().hex[:12]}"
        await put_account(redis, customer, rates=(policy,), costs={ENDPOINT: cost})
        reader = LimitsReader(Settings(), redis, pool)
        start = START_MS - START_MS % 60_000 + into
        world = World(connection, reader, share, start, customer, policy, cost)
        for name, a, b in steps:
            if name == "take":
                await world.take(a)
            elif name == "tick":
                world.now += a
            elif world.holders and not (holder := world.holders[a % len(world.holders)]).gone:
                if name == "renew":
                    await world.renew(holder, b, b)
                else:
                    await world.give_back(holder, b)
            await world.check()
        for holder in world.holders:  # every holder stops, having spent nothing more
            if not holder.gone:
                await world.give_back(holder, 0)
        await world.check()
    finally:
        await redis.aclose()
        await connection.aclose()


def per(algorithm: Algorithm, window: Per) -> RateLimit:
    return RateLimit(name="p", limit=10, per=window, algorithm=algorithm)


# Shapes a refund must get right, always tried: tokens given back after a bucket refilled
# and was drained again; after their window ended; by a renewal after a refused one.
REFILLED = [("take", 5, 0), ("tick", 60_000, 0), ("take", 30, 0), ("return", 0, 0)]
NEXT_WINDOW = [("take", 5, 0), ("tick", 1000, 0), ("take", 30, 0), ("return", 0, 0)]
AFTER_REFUSAL = [("take", 30, 0), ("renew", 0, 30), ("renew", 0, 0)]


@settings(max_examples=400, deadline=None)
@given(
    policy=policies,
    cost=st.integers(1, 3),
    share=st.sampled_from([1, 2, 8]),
    into=st.integers(0, 59_999),
    steps=st.lists(step, max_size=25),
)
@example(per(Algorithm.TOKEN_BUCKET, Per.MINUTE), 1, 2, 0, REFILLED)
@example(per(Algorithm.GCRA, Per.MINUTE), 1, 2, 0, REFILLED)
@example(per(Algorithm.FIXED_WINDOW, Per.SECOND), 1, 2, 500, NEXT_WINDOW)
@example(per(Algorithm.SLIDING_WINDOW, Per.SECOND), 1, 2, 500, [*NEXT_WINDOW, ("tick", 1000, 0)])
@example(per(Algorithm.FIXED_WINDOW, Per.MINUTE), 1, 1, 0, AFTER_REFUSAL)
def test_refunds_never_admit_what_the_plain_limit_would_refuse(
    database_url: str, policy: RateLimit, cost: int, share: int, into: int, steps: list[Step]
) -> None:
    asyncio.run(_replay(database_url, policy, cost, share, into, steps))
