"""Rate-limit tokens a lease took and its holder did not spend go back to the limit.

A lease takes its rate limits' tokens when granted.  Unrefunded, every unspent unit was
a call the customer's plan allowed and never got: an outside review found a customer of
100 calls a minute refused after 58 calls spread over many endpoints.  Each test admits
calls from leases, fully spent, until Tally refuses, on Redis's clock fixed by the test,
and counts them against what the plan allows — never fewer once the unspent part is back,
never more where the limit would have forgotten it anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from schemas.events import utcnow
from schemas.plans import Algorithm, LimitScope, Per, RateLimit
from services.api.enforcement.leaser import LeaseAsk, LeaseMode, Leaser, new_lease_id
from services.api.enforcement.limiter import Code
from services.api.enforcement.pipelined import Pipelined
from tests.conftest import REDIS_URL
from tests.lease_support import METER, put_account

TTL_MS, SETTLE_MS, MINUTE_MS = 2000, 300_000, 60_000


@pytest.fixture
async def leaser() -> AsyncIterator[Leaser]:
    connection = Pipelined(REDIS_URL, 5.0)
    yield Leaser(connection, TTL_MS, SETTLE_MS, 8)
    await connection.aclose()


def a_minute_from_now() -> int:
    """A moment (ms) a second into a minute: tests stay inside one fixed window."""
    now = int(utcnow().timestamp() * 1000)
    return (now // MINUTE_MS + 1) * MINUTE_MS + 1000


class Customer:
    """One customer's leases on one endpoint, on a clock the test moves."""

    def __init__(self, leaser: Leaser, customer: str, endpoint: str = "/v1/search") -> None:
        self.leaser, self.customer, self.endpoint = leaser, customer, endpoint

    async def take(self, at_ms: int, want: int = 1000) -> tuple[str, int]:
        ask = LeaseAsk(new_lease_id(), LeaseMode.TAKE, METER, want, endpoint=self.endpoint)
        grant = await self.leaser.ask(self.customer, ask, utcnow(), at_ms * 1000)
        assert grant.outcome.code is Code.OK, grant.outcome
        return ask.lease, grant.granted

    async def renew(self, lease: str, spent: int, at_ms: int, want: int = 1000) -> int:
        """The renewal's grant (0: refused)."""
        ask = LeaseAsk(lease, LeaseMode.RENEW, METER, want, spent, endpoint=self.endpoint)
        grant = await self.leaser.ask(self.customer, ask, utcnow(), at_ms * 1000)
        return grant.granted if grant.outcome.code is Code.OK else 0

    async def give_back(self, lease: str, spent: int, at_ms: int) -> None:
        ask = LeaseAsk(lease, LeaseMode.RETURN, spent=spent)
        grant = await self.leaser.ask(self.customer, ask, utcnow(), at_ms * 1000)
        assert grant.outcome.code is Code.RETURNED, grant.outcome

    async def spend_all(self, at_ms: int) -> int:
        """Calls admitted from a lease renewed, every unit spent, until refused."""
        try:
            lease, granted = await self.take(at_ms)
        except AssertionError:
            return 0
        admitted = 0
        while granted:
            admitted += granted
            granted = await self.renew(lease, granted, at_ms)
        return admitted


def per_minute(algorithm: Algorithm, **extra: object) -> RateLimit:
    return RateLimit.model_validate(
        {"name": "per-minute", "limit": 100, "per": Per.MINUTE, "algorithm": algorithm} | extra
    )


@pytest.mark.parametrize("algorithm", list(Algorithm))
async def test_unspent_tokens_come_back_on_renewal_and_return(
    redis: Redis, leaser: Leaser, tenant: str, algorithm: Algorithm
) -> None:
    customer = f"{tenant}-{algorithm.value}"
    await put_account(redis, customer, rates=(per_minute(algorithm),))
    calls, at = Customer(leaser, customer), a_minute_from_now()
    lease, granted = await calls.take(at)
    assert granted == 12  # 100 free, a share of 1/8
    renewed = await calls.renew(lease, 3, at + 10)  # 9 unspent go back first
    assert renewed == 12  # 97 free again
    await calls.give_back(lease, 5, at + 20)  # and 7 of these
    # 3 + 5 spent: the plan's other 92 calls a minute are still there
    assert await calls.spend_all(at + 30) == 92


@pytest.mark.parametrize("scope", [(LimitScope.ENDPOINT,), ()])
async def test_tokens_go_back_to_the_limit_that_gave_them(
    redis: Redis, leaser: Leaser, tenant: str, scope: tuple[LimitScope, ...]
) -> None:
    """A return names no endpoint: the term's record says which limit's state to credit."""
    customer = f"{tenant}-scoped"
    rate = per_minute(Algorithm.TOKEN_BUCKET, scope=scope)
    await put_account(redis, customer, rates=(rate,))
    search, at = Customer(leaser, customer, "/v1/search"), a_minute_from_now()
    lease, granted = await search.take(at)
    await search.give_back(lease, 1, at + 10)
    assert granted == 12
    assert await search.spend_all(at + 20) == 99
    other = await Customer(leaser, customer, "/v1/other").spend_all(at + 30)
    assert other == (100 if scope else 0)


@pytest.mark.parametrize("algorithm", [Algorithm.TOKEN_BUCKET, Algorithm.GCRA])
async def test_a_bucket_that_refilled_meanwhile_takes_back_nothing(
    redis: Redis, leaser: Leaser, tenant: str, algorithm: Algorithm
) -> None:
    """Had the 12 never been taken, a full bucket would have forgotten them within the
    7.2 s that refill 12 of 100 a minute: given back after, they would admit 12 too many."""
    customer = f"{tenant}-{algorithm.value}-refilled"
    await put_account(redis, customer, rates=(per_minute(algorithm),))
    calls, at = Customer(leaser, customer), a_minute_from_now()
    lease, granted = await calls.take(at)
    assert granted == 12
    later = at + 7200
    assert await calls.spend_all(later) == 100  # full again
    await calls.give_back(lease, 0, later + 1)
    assert await calls.spend_all(later + 2) == 0


async def test_a_partly_refilled_bucket_takes_back_what_it_still_owes(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    customer = f"{tenant}-half"
    await put_account(redis, customer, rates=(per_minute(Algorithm.TOKEN_BUCKET),))
    calls, at = Customer(leaser, customer), a_minute_from_now()
    assert await calls.spend_all(at) == 100  # empty
    lease, granted = await calls.take(at + 7200)  # 12 came back: a lease of one
    assert granted == 1
    await calls.give_back(lease, 0, at + 7200)
    assert await calls.spend_all(at + 7200) == 12


async def test_a_window_gives_back_only_what_it_still_counts(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    customer = f"{tenant}-window"
    await put_account(redis, customer, rates=(per_minute(Algorithm.FIXED_WINDOW),))
    calls, at = Customer(leaser, customer), a_minute_from_now()
    lease, granted = await calls.take(at + MINUTE_MS - 1100)  # the window's last second
    assert granted == 12
    assert await calls.spend_all(at + MINUTE_MS) == 100  # the next window: all 100
    await calls.give_back(lease, 0, at + MINUTE_MS + 10)  # counted in the window before
    assert await calls.spend_all(at + MINUTE_MS + 20) == 0


async def test_after_a_plan_change_nothing_is_given_back(
    redis: Redis, leaser: Leaser, tenant: str
) -> None:
    """Tokens go back only under the limits that took them."""
    customer = f"{tenant}-replanned"
    await put_account(redis, customer, rates=(per_minute(Algorithm.TOKEN_BUCKET),))
    calls, at = Customer(leaser, customer), a_minute_from_now()
    lease, _ = await calls.take(at)
    per_day = RateLimit(name="per-day", limit=10_000, per=Per.DAY)
    await put_account(redis, customer, rates=(per_minute(Algorithm.TOKEN_BUCKET), per_day))
    await calls.give_back(lease, 0, at + 10)
    assert await calls.spend_all(at + 20) == 100 - 12
