"""Waiting with a time limit, and stopping background tasks, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` returns the inner result when a cancellation arrives
in the same loop turn as the awaited thing finishes, and the cancellation is lost
(CPython gh-86296, fixed in 3.12). A background loop that waits on an event which is set
just as the loop is stopped then never stops, and its process (or a test) hangs at
shutdown. ``asyncio.timeout`` does not have the flaw.  Libraries swallow cancellations
too (redis-py can turn one that arrives while it waits for a reply into its own
``TimeoutError``, which a loop that keeps going while Redis is away catches), so a
background task is stopped by ``stop_task``, which cancels until the task ends, and a
loop that keeps going through errors takes each step ``surviving`` them, which lets a
cancellation in disguise end it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, TypeVar

import structlog

from services.common.logging import get_logger

log = get_logger("tally.runtime")
T = TypeVar("T")

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
    """Raise ``CancelledError`` if this task is being cancelled: a cancellation that a
    library swallowed (see above) still ends the task.  ``surviving`` calls it before
    it logs an error; a loop whose step can return normally from a swallowed
    cancellation calls it at the top of each turn too."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


Level = Literal["debug", "info", "warning", "error"]


class Attempt:
    """A step taken ``surviving`` errors: ``error`` is what it raised, if anything.

    A class, not a generator-based context manager: its ``__exit__`` returns ``bool``,
    which tells type checkers that the ``with`` may swallow what its body raises (the
    code after it is reachable)."""

    def __init__(
        self,
        logger: structlog.typing.FilteringBoundLogger,
        message: str,
        errors: tuple[type[Exception], ...],
        level: Level,
        fields: dict[str, Any],
    ) -> None:
        self._logger, self._level = logger, level
        self._message, self._errors, self._fields = message, errors, fields
        self.error: Exception | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: TracebackType | None
    ) -> bool:
        if not isinstance(error, self._errors):
            return False  # none, or not one to survive: a cancellation, a bug elsewhere
        reraise_if_cancelling()
        log_at = getattr(self._logger, self._level)  # only now: a step that succeeds logs nothing
        log_at(self._message, error=repr(error), **self._fields)
        self.error = error
        return True


def surviving(
    logger: structlog.typing.FilteringBoundLogger,
    message: str,
    *errors: type[Exception],
    level: Level = "error",
    **fields: Any,
) -> Attempt:
    """One step of a background loop that keeps going through errors (a store away, a
    bug in one pass): what the step raises of ``errors`` (default: any ``Exception``) is
    logged at ``level`` as ``message`` with ``fields`` and the error, and swallowed, and
    the loop goes on; an error raised while the task is being cancelled is the
    cancellation in disguise (see above) and ends the loop as ``CancelledError``.

    ``with surviving(log, "zones not refreshed", *UNREACHABLE) as attempt: ...``, then
    ``attempt.failed`` for a loop that waits longer, or starts over, after a failure."""
    return Attempt(logger, message, errors or (Exception,), level, fields)


class Backoff:
    """The waits of a loop retrying a failed step: ``first`` seconds, doubled after each
    failure in a row up to ``most``; ``reset`` once a step succeeds."""

    def __init__(self, first: float = 0.1, most: float = 10.0) -> None:
        self.first, self.most = first, most
        self.seconds = first
        """The next wait."""

    async def wait(self) -> None:
        await asyncio.sleep(self.seconds)
        self.seconds = min(self.most, self.seconds * 2)

    def reset(self) -> None:
        self.seconds = self.first


async def until_done(
    step: Callable[[], Awaitable[T]], logger: structlog.typing.FilteringBoundLogger, message: str
) -> T:
    """Take ``step`` until it returns: each failure is logged as ``message`` (``surviving``:
    a cancellation still ends it) and followed by a longer wait (``Backoff``)."""
    backoff = Backoff()
    while True:
        with surviving(logger, message, backoff=backoff.seconds):
            return await step()
        await backoff.wait()


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
