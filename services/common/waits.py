"""Waiting with a time limit, and stopping background tasks, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` returns the inner result when a cancellation arrives
in the same loop turn as the awaited thing finishes, and the cancellation is lost
(CPython gh-86296, fixed in 3.12). A background loop that waits on an event which is set
just as the loop is stopped then never stops, and its process (or a test) hangs at
shutdown. ``asyncio.timeout`` does not have the flaw.  Libraries swallow cancellations
too (redis-py can turn one that arrives while it waits for a reply into its own
``TimeoutError``, which a loop that keeps going while Redis is away catches), so a
background task is stopped by ``stop_task``, which cancels until the task ends.
"""

from __future__ import annotations

import asyncio

from services.common.logging import get_logger

log = get_logger("tally.runtime")

STOP_RETRY_SECONDS = 0.5
STOP_LIMIT_SECONDS = 10.0


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """True when ``event`` is set within ``seconds``, False when the time runs out."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def reraise_if_cancelling() -> None:
    """First thing in the ``except`` of a loop that keeps going through errors: an error
    that is a cancellation in disguise (redis-py, see above) ends the loop as the
    cancellation it was, instead of being logged and retried for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it ends, for at most ``STOP_LIMIT_SECONDS``.

    One cancellation is not always enough (see above), and a loop that carries on would
    hold the shutdown for ever.  A task still running at the limit is named in the log
    and left behind; one that ended with an error is logged.
    """
    deadline = asyncio.get_running_loop().time() + STOP_LIMIT_SECONDS
    while not task.done():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.error("background task would not stop", task=task.get_name())
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(STOP_RETRY_SECONDS, left))
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", task=task.get_name(), error=repr(task.exception()))
