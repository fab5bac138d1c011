"""A loop waiting on an event stops when cancelled, even if the event is set in the same
loop turn: the hang ``asyncio.wait_for`` causes on Python 3.11 (CPython gh-86296); and a
background task whose work swallows a cancellation still stops."""

from __future__ import annotations

import asyncio
import contextlib

from redis.exceptions import TimeoutError as RedisTimeout

from services.common.waits import stop_task, wait_set
from services.common.zone_book import ZoneBook


async def _waiting_loop(event: asyncio.Event, passes: list[int]) -> None:
    while True:
        event.clear()
        passes.append(1)
        await wait_set(event, 60)


async def test_a_cancel_that_meets_a_set_still_stops_the_loop() -> None:
    event, passes = asyncio.Event(), list[int]()
    task = asyncio.create_task(_waiting_loop(event, passes))
    await asyncio.sleep(0.01)
    event.set()  # the waiter wakes in the same turn as the cancellation below
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert done == {task} and task.cancelled()


async def test_it_tells_set_from_timed_out() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 0.01) is True


async def test_the_runtime_stops_a_task_that_swallows_one_cancellation() -> None:
    """A background loop whose job eats a cancellation is cancelled again, and ends."""

    async def stubborn() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):  # a job that eats it
                await asyncio.sleep(0.05)
            await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stop_task(task), 5)
    assert task.cancelled()


class _RedisTurningCancelIntoTimeout:
    """What redis-py can do: a cancellation arriving while it waits for a reply comes
    out as its own TimeoutError (caught by the zone book as "Redis away")."""

    async def get(self, key: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RedisTimeout("Timeout reading from socket") from None

    async def hgetall(self, key: str) -> dict[str, str]:
        return {}


async def test_the_zone_book_stops_when_redis_swallows_the_cancellation() -> None:
    """The shutdown hang seen in CI: the zone book's follower, cancelled mid-refresh,
    logged "zones not refreshed" and slept on; ``stop`` waited for it for ever."""
    book = ZoneBook(_RedisTurningCancelIntoTimeout(), refresh_seconds=0.01)  # type: ignore[arg-type]
    book._task = asyncio.create_task(book._follow())
    await asyncio.sleep(0.05)  # the follower now waits in ``get``
    await asyncio.wait_for(book.stop(), 5)
    assert book._task.done()
