"""The ClickHouse rows of several batches, inserted as one.

A chDB insert has a fixed cost of milliseconds, and each one leaves a part that
background merges rewrite, again and again as parts grow.  The aggregator's batches are
as small as its counters need them to be (each ingest request's events, tens of
milliseconds after its 202), so inserting each batch's rows on its own paid those costs
per batch: SDK-shaped rows at 4,000 a second took chDB 23-25 µs of CPU each in inserts
of 2,000 twice a second, 16-20 in inserts of 8,000 every two seconds, merges included.

So each batch is counted in Redis as it comes (counters and limits stay fresh) while its
rows wait here until ``rows`` of them are waiting or the oldest has waited ``seconds``;
one insert then takes them all, in a thread, while the next batches are counted.  What
a batch's records must not do before its rows are in is be acknowledged (their offsets
committed): a crash meanwhile replays them, Redis skips what it counted (by offset), and
ClickHouse takes the rows again, collapsing them by event key.  So each batch hands in
a ``Settled`` callback — the worker's acknowledgement — which runs once its rows are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

from schemas.envelope import StoredEvent
from services.aggregator.clickhouse_sink import ClickHouseSink, encode, joined
from services.common import metrics
from services.common.logging import get_logger
from services.common.waits import surviving, until_done

log = get_logger("tally.aggregator")

Settled = Callable[[], Awaitable[None]]
"""Runs once a batch's rows are in ClickHouse: the worker acknowledges its records."""

ROOM = 4
"""Batches wait to be gathered while ``ROOM`` times ``rows`` are already waiting (an
insert failing and retried): the aggregator stops taking records, not memory.  A batch
counts as a row besides its rows: those of dead letters only hold their records too."""


class _Waiting:
    """Rows not yet inserted, in order, with what runs once they are."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.settled: list[Settled] = []
        self.rows = 0
        self.since = 0.0  # monotonic time of the oldest, when any

    def add(self, chunk: bytes, rows: int, settled: Settled | None) -> None:
        if not self:
            self.since = time.monotonic()
        if rows:
            self.chunks.append(chunk)
            self.rows += rows
        if settled is not None:
            self.settled.append(settled)

    @property
    def size(self) -> int:
        """Rows and batches: what ``ROOM`` bounds."""
        return self.rows + len(self.settled)

    def __bool__(self) -> bool:
        return self.size > 0

    def then(self, later: _Waiting) -> _Waiting:
        """These, with ``later``'s after them (an insert failed: they wait again)."""
        self.chunks += later.chunks
        self.settled += later.settled
        self.rows += later.rows
        return self


class Gathering:
    def __init__(self, sink: ClickHouseSink, rows: int, seconds: float) -> None:
        self._sink = sink
        self._rows = rows
        self._seconds = seconds
        self._waiting = _Waiting()
        self._in_flight = 0  # the size of what an insert under way took
        self._inserting = asyncio.Lock()
        self._arrived = asyncio.Event()  # something waits
        self._full = asyncio.Event()  # ``rows`` wait
        self._room = asyncio.Event()  # under ``ROOM`` times ``rows`` wait
        self._room.set()

    def insert_soon(self) -> None:
        """Insert what waits now, without waiting out ``seconds`` (a rebalance waits for
        every record taken to be acknowledged before it hands partitions on)."""
        if self._waiting:
            self._full.set()

    def hurry(self) -> None:
        """Insert what waits now, and each batch's rows as they come from now on: a stop
        is on its way, and what it waits for (``tally up``'s front waits for the
        records it logged to be committed) should not wait out ``seconds`` as well."""
        self._seconds = 0.0
        self._full.set()

    @property
    def waiting(self) -> int:
        """Rows waiting to be inserted."""
        return self._waiting.rows

    async def add(self, events: Sequence[StoredEvent], settled: Settled | None = None) -> None:
        """Gather a batch's rows (encoded now: the events themselves can go); ``settled``
        runs once they are in ClickHouse, after those of every batch before it."""
        while self._waiting.size + self._in_flight >= ROOM * self._rows:
            self._room.clear()
            await self._room.wait()
        self._waiting.add(encode(events) if events else b"", len(events), settled)
        self._arrived.set()
        if self._waiting.rows >= self._rows:
            self._full.set()

    async def flush(self) -> None:
        """Insert every row waiting, then run what waited on them.  When the insert
        fails, everything stays waiting, before what arrived meanwhile, and the error
        is raised."""
        async with self._inserting:
            taken, self._waiting = self._waiting, _Waiting()
            self._in_flight = taken.size
            try:
                if taken.rows:
                    with metrics.SINK_SECONDS.labels("clickhouse").time():
                        await self._sink.insert(joined(taken.chunks))
            except BaseException:
                self._waiting = taken.then(self._waiting)
                raise
            finally:
                self._in_flight = 0
                if self._waiting.size < ROOM * self._rows:
                    self._room.set()
            for settled in taken.settled:
                with surviving(log, "a batch stored in both sinks was not acknowledged"):
                    await settled()  # (its records are read again after a restart)

    async def run(self) -> None:
        """Insert whenever ``rows`` are waiting or the oldest has waited ``seconds``,
        retrying a failed insert until it goes in: for as long as the aggregator runs."""
        while True:
            await self._arrived.wait()
            deadline = self._waiting.since + self._seconds
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(_loop_time(deadline)):
                    await self._full.wait()
            self._arrived.clear()
            self._full.clear()
            await until_done(self.flush, log, "ClickHouse insert failed; retrying")
            if self._waiting:  # arrived while inserting
                self._arrived.set()


def _loop_time(monotonic: float) -> float:
    """``monotonic`` on the running loop's clock (uvloop's is not ``time.monotonic``)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())
