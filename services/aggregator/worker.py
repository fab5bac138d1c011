"""The Faust app: consumes ``tally.events`` in batches and hands them to the processor.

A batch's records are acknowledged (and later committed) by hand, once the processor
has them in both sinks: counted in Redis at once, inserted into ClickHouse with the rows
of the batches around them (``services.aggregator.gathering``).  The loop body never
leaves a batch half stored: a failing sink is retried until it answers, and a shutdown
waits for the batch in hand.  A process killed outright commits nothing more, and the
idempotent sinks absorb the replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.tables import TableManager

from schemas import topics
from schemas.envelope import MAX_ENVELOPE_BYTES
from services.aggregator.gathering import Settled
from services.aggregator.processor import BatchProcessor, DeadLetter, Record
from services.aggregator.transport import Transport
from services.common import metrics
from services.common.logging import get_logger
from services.common.settings import Settings
from services.common.waits import until_done

log = get_logger("tally.aggregator")


class _App(faust.App):
    rebalance_starting: Callable[[], object] | None = None
    """Called (in the consumer's thread) as a rebalance starts."""

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)

    def on_rebalance_start(self) -> None:
        super().on_rebalance_start()
        if self.rebalance_starting is not None:
            self.rebalance_starting()


class _Tables(TableManager):
    """Faust's table manager starts with a one-second sleep, for tables to be declared;
    the consumer subscribes (and joins its group) only after it.  Tally declares no
    tables (its state lives in Redis and ClickHouse) and declares its agent before the
    app starts, so the wait only delayed every start and restart by a second.

    ``on_start`` is Faust's own minus the sleep, and calls two of its private members:
    ``pyproject.toml`` keeps faust-streaming below the next minor release for that."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def create_app(settings: Settings, bootstrap_servers: str) -> _App:
    """The aggregator's Faust app.  Its consumer-group timings decide how fast a
    restarted worker counts again: a worker stopped in order leaves the group; one
    killed stays a member until ``group_session_timeout`` passes without its heartbeat,
    and on Tansu every join is held for half that timeout (see ``Settings``)."""
    session = settings.group_session_timeout
    return _App(
        settings.consumer_group,
        broker=f"kafka://{bootstrap_servers}",
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        datadir=str(Path(settings.data_dir) / "faust"),
        topic_partitions=settings.events_partitions,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session,
        broker_rebalance_timeout=settings.kafka_rebalance_timeout,
        broker_heartbeat_interval=min(3.0, session / 3),
        TableManager=_Tables,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=4096,
    )


def dead_letter_sender(app: faust.App) -> DeadLetter:
    """Send records the aggregator cannot read to ``tally.events.dlq`` with the reason."""
    topic = app.topic(topics.DEAD_LETTERS, key_type=bytes, value_type=bytes)

    async def send(record: Record, reason: str) -> None:
        delivery = await topic.send(value=dead_letter_message(record, reason))
        await delivery  # queued is not stored: wait for the broker's ack

    return send


def dead_letter_message(record: Record, reason: str) -> bytes:
    """The reason, where the record sits, and the record itself when it fits a message."""
    payload: dict[str, Any] = {
        "reason": reason,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "value": record.value.decode(errors="replace"),
    }
    message = orjson.dumps(payload)
    if len(message) > MAX_ENVELOPE_BYTES:  # JSON escaping can double a record's size
        del payload["value"]
        payload["value_bytes"] = len(record.value)
        message = orjson.dumps(payload)
    return message


def attach(app: _App, settings: Settings, processor: BatchProcessor) -> None:
    """Register the aggregating agent and the lag reporter on ``app``.  A rebalance
    waits for every record taken to be acknowledged before it hands partitions on, and
    a batch is acknowledged once its rows are in ClickHouse: as one starts, the rows
    gathered are inserted at once."""
    events = app.topic(topics.EVENTS, key_type=bytes, value_type=bytes)
    loop = asyncio.get_running_loop()
    app.rebalance_starting = partial(loop.call_soon_threadsafe, processor.insert_soon)
    joining = time.monotonic()  # the app starts, and asks to join, right after

    async def joined(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Say how long the first join took since the app started: the part of a
        restart the broker decides (``bench.rejoin`` reads it)."""
        log.info(
            "consumer group joined",
            partitions=len(args[0]) if args else None,
            since_start_seconds=round(time.monotonic() - joining, 2),
        )

    # mode types receivers as returning ``Awaitable[None] | None``: a coroutine is one
    app.on_partitions_assigned.connect(joined)  # type: ignore[arg-type]

    @app.agent(events, name="aggregate")
    async def aggregate(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.noack_take(  # type: ignore[attr-defined]
            settings.aggregator_batch_records, within=settings.aggregator_batch_seconds
        ):
            records = [_record(event) for event in batch]
            await _finish(_aggregate(processor, records, partial(_acknowledge, stream, batch)))

    @app.timer(interval=2.0)  # type: ignore[untyped-decorator]
    async def report_lag() -> None:
        for tp in app.consumer.assignment():
            high = app.consumer.highwater(tp)
            position = processor.positions.get((tp.topic, tp.partition))
            if high is not None and position is not None:
                metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, high - position - 1))


async def drain(
    processor: BatchProcessor, bootstrap_servers: str, progress: Callable[[], None]
) -> None:
    """Wait until every partition of ``tally.events`` is processed up to its end,
    calling ``progress`` whenever the processed positions move.

    For the embedded in-memory broker, which dies with the process: what it still holds
    would be lost.  (With Kafka, stopping a worker simply hands its partitions on.)
    Run it under a timeout: a worker that never joined its group never catches up.
    """
    ends = await _end_offsets(bootstrap_servers)
    seen = dict(processor.positions)
    while _behind(processor, ends):
        await asyncio.sleep(0.1)
        if processor.positions != seen:
            seen = dict(processor.positions)
            progress()


def _behind(processor: BatchProcessor, ends: dict[int, int]) -> bool:
    return any(
        processor.positions.get((topics.EVENTS, partition), -1) < end - 1
        for partition, end in ends.items()
    )


async def _end_offsets(bootstrap_servers: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topics.EVENTS, p)
            for p in consumer.partitions_for_topic(topics.EVENTS) or ()
        ]
        ends = await consumer.end_offsets(partitions) if partitions else {}
    finally:
        await consumer.stop()
    return {tp.partition: offset for tp, offset in ends.items()}


def _record(event: Any) -> Record:
    message = event.message
    return Record(message.topic, message.partition, message.offset, message.value)


async def _aggregate(
    processor: BatchProcessor, records: Sequence[Record], settled: Settled
) -> None:
    """Decode once (dead letters are sent once), then store until the sinks take it."""
    batch = await until_done(lambda: processor.decode(records), log, "decode failed; retrying")
    await until_done(lambda: processor.store(batch, settled), log, "store failed; retrying")


async def _acknowledge(stream: faust.StreamT[bytes], events: Sequence[Any]) -> None:
    """The records are in both sinks: their offsets may be committed."""
    for event in events:
        await stream.ack(event)


async def _finish(work: Any) -> None:
    """Run ``work`` to the end even if we are cancelled meanwhile, then re-raise."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
