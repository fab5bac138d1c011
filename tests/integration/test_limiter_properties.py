"""Each rate-limit algorithm of the enforcement script against a reference model.

The script runs in the real Redis with its clock overridden; the models are written
differently on purpose — exact fractions, tokens instead of arrival times — so that
agreement means both describe the same limiter, not that one was copied from the other.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.account_state import compile_inline
from schemas.plans import Algorithm, Per, RateLimit
from services.api.enforcement.limiter import Limiter, Mode
from services.api.enforcement.pipelined import Pipelined
from tests.conftest import REDIS_URL

START_MS = 1_790_000_000_000
LIMITS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20]  # divide a window in whole µs


@dataclass
class TokenBucket:
    """Tokens refill continuously at limit/window; a call takes ``cost`` of them."""

    capacity: int
    per_ms: Fraction
    tokens: Fraction
    at: int

    def admit(self, now: int, cost: int, commit: bool = True) -> bool:
        tokens = min(Fraction(self.capacity), self.tokens + (now - self.at) * self.per_ms)
        if tokens < cost:
            return False
        if commit:
            self.tokens, self.at = tokens - cost, now
        return True


@dataclass
class Windows:
    """Counts per window; ``sliding`` weighs the previous window by its overlap."""

    limit: int
    window: int
    sliding: bool
    counts: dict[int, int]

    def admit(self, now: int, cost: int, commit: bool = True) -> bool:
        index, into = divmod(now, self.window)
        estimate = Fraction(self.counts.get(index, 0))
        if self.sliding:
            previous = self.counts.get(index - 1, 0)
            estimate += Fraction(previous * (self.window - into), self.window)
        if estimate + cost > self.limit:
            return False
        if commit:
            self.counts[index] = self.counts.get(index, 0) + cost
        return True


def model(policy: RateLimit, start: int) -> TokenBucket | Windows:
    window = policy.per.seconds * 1000
    if policy.algorithm in (Algorithm.TOKEN_BUCKET, Algorithm.GCRA):
        rate = Fraction(policy.limit, window)
        return TokenBucket(policy.capacity, rate, Fraction(policy.capacity), start)
    sliding = policy.algorithm is Algorithm.SLIDING_WINDOW
    return Windows(policy.limit, window, sliding, {})


policies = st.builds(
    RateLimit,
    name=st.just("p"),
    limit=st.sampled_from(LIMITS),
    per=st.sampled_from([Per.SECOND, Per.MINUTE]),
    burst=st.none() | st.integers(1, 40),
    algorithm=st.sampled_from(list(Algorithm)),
)
# Pauses: arbitrary ones, and whole fractions of the windows, where decisions flip.
boundaries = [w * k // n for w in (1000, 60_000) for n in LIMITS for k in (1, 2, 3)]
pauses = st.integers(0, 3000) | st.sampled_from(boundaries) | st.sampled_from([0, 1, 2])
steps = st.lists(st.tuples(pauses, st.integers(1, 3)), min_size=1, max_size=40)


async def _replay(policy: RateLimit, calls: list[tuple[int, int]]) -> None:
    connection = Pipelined(REDIS_URL, 5.0)
    try:
        limiter = Limiter(connection, 1000)
        address = f"prop-{uuid.uuid4().hex}"
        now = START_MS + int(uuid.uuid4().int % 60_000)
        reference = model(policy, now)
        for advance, cost in calls:
            now += advance
            rates = compile_inline((policy,), {"/call": cost})
            outcome = await limiter.limit_address(address, rates, Mode.CHECK, now * 1000, "/call")
            expected = reference.admit(now, cost)
            assert outcome.allowed == expected, (policy, now, cost)
            if not outcome.allowed and cost <= min(policy.capacity, policy.limit):
                retry = outcome.violated.retry_ms if outcome.violated else 0
                assert reference.admit(now + retry, cost, commit=False), (policy, retry)
    finally:
        await connection.aclose()


@settings(max_examples=150, deadline=None)
@given(policy=policies, calls=steps)
def test_each_algorithm_matches_its_reference_model(
    policy: RateLimit, calls: list[tuple[int, int]]
) -> None:
    asyncio.run(_replay(policy, calls))
