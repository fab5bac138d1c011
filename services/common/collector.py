"""The garbage collector held off while a batch of events is worked on.

Judging a batch of 5,000 events and encoding its envelopes allocates tens of thousands
of containers that all stay alive until the batch is published.  Every 700 allocations
CPython's collector walks the young ones, and every tenth time the older ones too: each
walk finds the whole batch alive and frees nothing.  At 4,000 events/s ingest spent 8 to
10 % of its CPU there (2 to 3 µs an event, `docs/benchmarks.md`).  What a batch leaves
behind is freed by reference counting as soon as it is published; the next collection
after the pause sees only what is still alive then.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic collection inside the block (an explicit ``gc.collect()`` still runs).

    Collection comes back on when the block that paused it ends, whatever other blocks are
    still inside theirs: a pause lasts as long as one request at most, however busy the
    process (concurrent requests never keep the collector off between them).  A
    collector switched off by someone else stays off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def without_collection(work: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``work`` (a coroutine function) run with the collector paused until it has returned:
    what it allocated and dropped is freed with its frame before collection comes back on.
    Decorate the function that makes a batch and lets it go, not one that returns it."""

    @functools.wraps(work)
    async def paused(*args: P.args, **kwargs: P.kwargs) -> T:
        with collector_paused():
            return await work(*args, **kwargs)

    return paused
