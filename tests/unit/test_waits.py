"""A loop waiting on an event stops when cancelled, even if the event is set in the same
loop turn: the hang ``asyncio.wait_for`` causes on Python 3.11 (CPython gh-86296)."""

from __future__ import annotations

import asyncio
import contextlib

from services.common.waits import wait_set
from services.runtime import _stop


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
    await asyncio.wait_for(_stop(task), 5)
    assert task.cancelled()
