"""Keeping the log short: segments go once the aggregator has committed past them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.common.logging import get_logger
from services.common.waits import surviving
from services.ingest.wal.committed import CommittedOffsets
from services.ingest.wal.journal import Journal

log = get_logger("tally.ingest.wal")


async def keep_trimmed(journal: Journal, committed: CommittedOffsets, every: float) -> None:
    """Every ``every`` seconds, for as long as ingest serves."""
    while True:
        await asyncio.sleep(every)
        # the broker away: the log just waits longer
        with surviving(log, "write-ahead log trim skipped", level="warning"):
            await journal.trim(await committed.events(journal.partitions()))


async def trim_before_close(
    journal: Journal,
    committed: CommittedOffsets,
    patience: float,
    moving: Callable[[], None],
    every: float = 0.2,
) -> None:
    """At a graceful stop, while the aggregator still runs: wait until it has counted
    what the log holds, so a later start replays nothing that a dedupe window long gone
    could no longer recognise.  ``moving`` is called while the committed offsets advance
    (it extends the shutdown bound); ``patience`` seconds without progress end the wait
    and the rest is left for the next start."""
    last: dict[int, int] | None = None
    still = time.monotonic()
    while journal.segments:
        try:
            offsets = await committed.events(journal.partitions())
        except Exception as exc:
            log.warning("write-ahead log left for the next start", error=repr(exc))
            return
        await journal.trim(offsets)
        if offsets != last:
            last, still = offsets, time.monotonic()
            moving()
        elif time.monotonic() - still > patience:
            break
        await asyncio.sleep(every)
    log.info("write-ahead log at stop", segments_left=len(journal.segments))
