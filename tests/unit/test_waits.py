"""A loop waiting on an event stops when cancelled, even if the event is set in the same
loop turn: the hang ``asyncio.wait_for`` causes on Python 3.11 (CPython gh-86296); a
background task whose work swallows a cancellation still stops; a loop that keeps going
through errors (``surviving``) logs and goes on, but ends on a cancellation in disguise."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.exceptions import TimeoutError as RedisTimeout
from structlog.testing import capture_logs

from services.common.logging import get_logger
from services.common.waits import Backoff, stop_task, surviving, wait_set
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


log = get_logger("tally.test")


async def test_a_step_that_fails_is_logged_and_the_loop_goes_on() -> None:
    with (
        capture_logs() as logs,
        surviving(log, "step failed", level="warning", turn=3) as attempt,
    ):
        raise ConnectionError("store away")
    assert attempt.failed and isinstance(attempt.error, ConnectionError)
    assert logs == [
        {
            "event": "step failed",
            "log_level": "warning",
            "error": "ConnectionError('store away')",
            "turn": 3,
        }
    ]


async def test_a_step_that_succeeds_logs_nothing() -> None:
    with capture_logs() as logs, surviving(log, "step failed") as attempt:
        pass
    assert not attempt.failed and attempt.error is None and logs == []


async def test_only_the_named_errors_are_survived() -> None:
    with pytest.raises(KeyError), surviving(log, "step failed", ConnectionError, OSError):
        raise KeyError("a bug, not a store away")


async def test_an_error_raised_by_a_cancellation_ends_the_loop_as_a_cancellation() -> None:
    """A client library that answers a cancellation with its own error (redis-py's
    TimeoutError): the loop is not logged and retried, it ends cancelled."""
    turns: list[int] = []

    async def loop() -> None:
        while True:
            turns.append(1)
            with surviving(log, "read failed"):
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    raise RedisTimeout("Timeout reading from socket") from None

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    with capture_logs() as logs:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
    assert done == {task} and task.cancelled()
    assert turns == [1] and logs == []


async def test_backoff_doubles_up_to_its_most_and_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.001, most=0.003)
    seen = []
    for _ in range(4):
        seen.append(backoff.seconds)
        await backoff.wait()
    assert seen == [0.001, 0.002, 0.003, 0.003]
    backoff.reset()
    assert backoff.seconds == 0.001
