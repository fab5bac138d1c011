"""Redis blackholed under the enforcement path: decisions stop waiting for it.

After a few decisions time out, the breaker opens and the next ones are decided by the
fallback (failing open) or refused (failing closed) at once; after a cool-down one
decision probes Redis, and when Redis answers again the breaker closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from services.common.settings import Settings
from tests.accounts_support import Account, running_api, sign_up
from tests.conftest import REDIS_URL
from tests.faults import FaultProxy

SERVICE = {"Authorization": "Bearer test-token"}
TIMEOUT = 0.5  # the enforcement path's Redis timeout here (default 1 s)


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    with FaultProxy(urlsplit(REDIS_URL).port or 6379) as proxy:
        yield proxy


async def decide(api: httpx.AsyncClient, account: Account) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = await api.post("/v1/enforce", json={"customer": account.customer}, headers=SERVICE)
    return reply, time.monotonic() - started


async def test_the_twentieth_decision_with_redis_blackholed_does_not_wait(
    settings: Settings, redis_proxy: FaultProxy
) -> None:
    redis_url = redis_proxy.url("redis", urlsplit(REDIS_URL).path)
    async with running_api(
        settings,
        redis_url=redis_url,
        enforce_redis_timeout=TIMEOUT,
        fallback_rate_per_minute=100_000,
    ) as api:
        account = await sign_up(api, "pro")
        reply, _ = await decide(api, account)
        assert reply.status_code == 200 and not reply.json().get("fallback")
        redis_proxy.blackhole()
        timings = []
        for _ in range(20):
            reply, took = await decide(api, account)
            assert reply.status_code == 200, reply.text
            assert reply.json()["fallback"] is True
            timings.append(took)
        print("decisions with Redis blackholed (s):", [round(t, 3) for t in timings])
        assert timings[-1] < TIMEOUT / 5
        assert sum(timings[10:]) < TIMEOUT  # the last ten together: no full timeout among them


async def test_concurrent_decisions_keep_answering_at_once_until_redis_is_back(
    settings: Settings, redis_proxy: FaultProxy
) -> None:
    """Under load for several cool-downs: only the decisions in flight when Redis went
    quiet wait for the timeout; none queues behind a reconnection attempt; when Redis
    answers again, decisions use it again."""
    redis_url = redis_proxy.url("redis", urlsplit(REDIS_URL).path)
    async with running_api(
        settings,
        redis_url=redis_url,
        enforce_redis_timeout=TIMEOUT,
        fallback_rate_per_minute=100_000,
    ) as api:
        account = await sign_up(api, "pro")
        await decide(api, account)
        redis_proxy.blackhole()
        tripped = time.monotonic()
        timings: list[tuple[float, float]] = []
        stalls: list[tuple[float, float]] = []  # when the event loop itself stood still

        async def client() -> None:
            while time.monotonic() - tripped < 4 * TIMEOUT:
                reply, took = await decide(api, account)
                assert reply.status_code in (200, 429), reply.text  # the fallback's answer
                timings.append((time.monotonic() - tripped, took))

        async def loop_watch() -> None:
            """A wait of the breaker's leaves the loop running; a stall of the whole loop
            (a garbage collection of the test process's large heap, a starved CPU) holds
            every decision at once, and is not the breaker's doing."""
            last = time.monotonic()
            while last - tripped < 4 * TIMEOUT:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                if now - last > TIMEOUT / 5:
                    stalls.append((last - tripped, now - tripped))
                last = now

        await asyncio.gather(loop_watch(), *(client() for _ in range(8)))
        late = [(round(at, 2), round(took, 2)) for at, took in timings if at > 2 * TIMEOUT]
        slow = [
            (at, took)
            for at, took in late
            if took > TIMEOUT / 2
            and not any(start < at and at - took < end for start, end in stalls)
        ]
        print(f"{len(timings)} decisions; after {2 * TIMEOUT}s, slow: {slow}; stalls: {stalls}")
        assert len(late) > 20 and not slow
        redis_proxy.restore()
        restored = time.monotonic()
        while (await decide(api, account))[0].json().get("fallback"):
            assert time.monotonic() - restored < 4 * TIMEOUT, "Redis back, still falling back"
            await asyncio.sleep(0.05)
        print(f"decisions use Redis again {time.monotonic() - restored:.2f}s after it is back")


async def test_failing_closed_refuses_at_once_once_the_breaker_is_open(
    settings: Settings, redis_proxy: FaultProxy
) -> None:
    redis_url = redis_proxy.url("redis", urlsplit(REDIS_URL).path)
    async with running_api(
        settings, redis_url=redis_url, enforce_redis_timeout=TIMEOUT, redis_failure_mode="closed"
    ) as api:
        account = await sign_up(api, "pro")
        await decide(api, account)
        redis_proxy.blackhole()
        answers = [await decide(api, account) for _ in range(20)]
    for reply, _ in answers:
        assert reply.status_code == 503, reply.text
        assert reply.headers["content-type"].startswith("application/problem+json")
        assert reply.json()["type"].endswith("/enforcement-unavailable")
        assert int(reply.headers["retry-after"]) > 0
    assert answers[-1][1] < TIMEOUT / 5
