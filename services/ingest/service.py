"""Ingest as a running service."""

from __future__ import annotations

import functools
from pathlib import Path

from schemas import topics
from services.common.logging import get_logger
from services.ingest import corrections, emitters
from services.ingest.app import Ingest, durably, openapi_schemas, router
from services.ingest.backpressure import Backpressure
from services.ingest.publisher import Publisher
from services.ingest.wal import segment
from services.ingest.wal.committed import CommittedOffsets
from services.ingest.wal.journal import Journal
from services.ingest.wal.replay import replay
from services.ingest.wal.trim import keep_trimmed, trim_before_close
from services.runtime import Component, Runtime

log = get_logger("tally.ingest")
TRIM_EVERY_SECONDS = 1.0
CLOSE_PATIENCE_SECONDS = 3.0  # > Faust's 1 s commit interval: a stalled count, not a slow one


async def start(runtime: Runtime) -> Component:
    producer = await runtime.producer()

    async def kafka() -> None:
        await producer.partitions_for(topics.EVENTS)

    publisher = Publisher(producer)
    if runtime.settings.ingest_wal_enabled:
        publisher = Publisher(producer, await _journal(runtime, publisher))
    elif _left_behind(runtime.settings.wal_path):
        log.warning(
            "the write-ahead log holds segments but TALLY_INGEST_WAL is off: they are not"
            " replayed (set it to on for one start to replay them)",
            path=str(runtime.settings.wal_path),
        )
    guard = backpressure(runtime, await runtime.bootstrap_servers())
    meters = await runtime.meters()
    ingest = Ingest(runtime.settings, publisher, await runtime.authenticator(), guard, meters)
    corrector = corrections.Corrector(
        runtime.settings,
        ingest.auth,
        meters,
        runtime.redis(),
        await runtime.pool(),
        functools.partial(durably, ingest),
    )
    return Component(
        "ingest",
        routers=[router(ingest), emitters.router(ingest), corrections.router(corrector)],
        checks={"kafka": kafka},
        schemas=openapi_schemas(),
    )


def backpressure(runtime: Runtime, bootstrap: str) -> Backpressure | None:
    """The aggregator's lag, watched in the background (``TALLY_INGEST_MAX_LAG_SECONDS``)."""
    settings = runtime.settings
    if not settings.ingest_max_lag_seconds:
        return None
    guard = Backpressure(bootstrap, settings.consumer_group, settings.ingest_max_lag_seconds)
    runtime.background(guard.run(), "ingest backpressure")
    return guard


def _left_behind(path: Path) -> bool:
    return path.is_dir() and bool(segment.existing(path))


async def _journal(runtime: Runtime, plain: Publisher) -> Journal:
    """Open the write-ahead log, produce what it kept from before, keep it trimmed."""
    settings = runtime.settings
    recovery = Journal.open(
        settings.wal_path, settings.ingest_wal_segment_bytes, settings.ingest_wal_segment_seconds
    )
    journal = recovery.journal
    committed = CommittedOffsets(await runtime.bootstrap_servers(), settings.consumer_group)
    await committed.start()
    runtime.stack.push_async_callback(committed.close)
    await replay(recovery, plain.produce_in_batches)

    async def close() -> None:  # before the aggregator stops: it counts what is left
        await journal.close()
        # back commits as its ClickHouse inserts go in: told to hurry, at once, else every
        # TALLY_AGGREGATOR_INSERT_SECONDS
        patience = CLOSE_PATIENCE_SECONDS + settings.aggregator_insert_seconds
        await trim_before_close(journal, committed, patience, runtime.shutdown.extend)

    runtime.stack.push_async_callback(close)
    runtime.background(keep_trimmed(journal, committed, TRIM_EVERY_SECONDS), "write-ahead log trim")
    log.info("write-ahead log open", path=str(settings.wal_path), replayed=recovery.records)
    return journal
