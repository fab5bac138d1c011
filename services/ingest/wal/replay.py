"""Start-up after a crash: what the log still holds goes back into the topic.

The embedded broker starts empty, so every record of a surviving segment is produced
again before ingest serves; the old segments stay and are trimmed like any other once
the aggregator has committed past the offsets the records got now.  Records that had
been counted before the crash come back as repeats, which the aggregator drops by
(source, id) within ``TALLY_DEDUPE_WINDOW_HOURS`` and ClickHouse collapses.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from services.common.logging import get_logger
from services.ingest.wal.journal import Recovery
from services.ingest.wal.segment import Record

log = get_logger("tally.ingest.wal")
Produce = Callable[[list[Record]], Awaitable[list[tuple[int, int]]]]
CHUNK_RECORDS = 20_000  # produced at once: bounded memory, the producer's batches full


async def replay(recovery: Recovery, produce: Produce) -> None:
    """Produce every recovered record (acknowledged by Kafka) and note its offset."""
    if not recovery.pending:
        return
    started = time.monotonic()
    total_bytes = 0
    for old, records in recovery.pending:
        for start in range(0, len(records), CHUNK_RECORDS):
            chunk = records[start : start + CHUNK_RECORDS]
            old.settle(await produce(chunk))
            total_bytes += sum(len(r.value) for r in chunk)
        old.outstanding = 0
    log.info(
        "write-ahead log replayed",
        segments=len(recovery.pending),
        records=recovery.records,
        bytes=total_bytes,
        seconds=round(time.monotonic() - started, 3),
    )
