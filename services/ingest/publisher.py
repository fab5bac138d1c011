"""Publishing accepted events as envelopes, and rejections to the DLQ.

A request becomes one record per partition its customers hash to (``envelope_records``).
``publish`` returns only when Kafka has acknowledged every record (acks=all) and, when
ingest keeps a write-ahead log (the embedded broker keeps topics in memory only), when
the log has made them durable too: that is what lets ingest answer 202 and promise that
nothing accepted is lost.  The produce and the log's write run at the same time.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata

from schemas import envelope, topics
from schemas.envelope import Publishable
from services.ingest.parsing import Verdict
from services.ingest.wal.journal import Journal
from services.ingest.wal.segment import Record

_PARTITIONER = DefaultPartitioner()  # aiokafka's own: murmur2 of the key, as ``send``


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, journal: Journal | None = None) -> None:
        self._producer = producer
        self._journal = journal

    async def publish(
        self, events: Iterable[Publishable], received_at: datetime, catalog_version: int = 0
    ) -> None:
        """Make ``events`` durable in Kafka (and the write-ahead log), stamped with the
        meter catalog version ingest held when it accepted them."""
        partitions = await self._partitions()
        records = envelope_records(events, received_at, partitions, catalog_version)
        if not records:  # every event rejected: nothing to log (an empty append never flushes)
            return
        if self._journal is None:
            await self.produce(records)
            return
        ticket = self._journal.append(records)
        offsets = None
        try:
            offsets, _ = await asyncio.gather(self.produce(records), ticket.wait())
        finally:  # offsets None: not acknowledged, so the log need not keep them
            self._journal.release(ticket, offsets)

    async def produce(self, records: list[Record]) -> list[tuple[int, int]]:
        """Send ``records`` to ``tally.events``; (partition, offset) of each once Kafka
        has acknowledged them all."""
        partitions = await self._partitions()
        deliveries = [
            await self._producer.send(
                topics.EVENTS, value=r.value, key=r.key, partition=partition_of(r.key, partitions)
            )
            for r in records
        ]
        return [(m.partition, m.offset) for m in await asyncio.gather(*deliveries)]

    async def _partitions(self) -> tuple[int, ...]:
        return tuple(sorted(await self._producer.partitions_for(topics.EVENTS)))

    async def produce_in_batches(self, records: list[Record]) -> list[tuple[int, int]]:
        """``produce`` for many records at once (the log's replay at start-up): built into
        one batch per partition and request, which costs a tenth of a ``send`` per record.
        Partitioned by key as ``send`` does, so a customer's records stay together."""
        partitions = await self._partitions()
        by_partition: dict[int, list[int]] = defaultdict(list)  # partition -> indexes
        for index, record in enumerate(records):
            by_partition[partition_of(record.key, partitions)].append(index)
        sent: list[tuple[int, list[int], asyncio.Future[RecordMetadata]]] = []
        for partition, indexes in by_partition.items():
            for batch, members in self._batches(records, indexes):
                delivery = await self._producer.send_batch(
                    batch, topics.EVENTS, partition=partition
                )
                sent.append((partition, members, delivery))
        offsets = [(0, 0)] * len(records)
        for partition, members, delivery in sent:
            base = (await delivery).offset
            for position, index in enumerate(members):
                offsets[index] = (partition, base + position)
        return offsets

    def _batches(
        self, records: list[Record], indexes: list[int]
    ) -> Iterator[tuple[BatchBuilder, list[int]]]:
        batch, members = self._producer.create_batch(), list[int]()
        for index in indexes:
            record = records[index]
            if batch.append(key=record.key, value=record.value, timestamp=None) is None:
                yield batch, members
                batch, members = self._producer.create_batch(), list[int]()
                batch.append(key=record.key, value=record.value, timestamp=None)
            members.append(index)
        if members:
            yield batch, members

    async def dead_letter(
        self, rejected: Iterable[Verdict], received_at: datetime, request_id: str
    ) -> None:
        deliveries = [
            await self._producer.send(
                topics.DEAD_LETTERS,
                value=_dead_letter(verdict, received_at, request_id),
                key=_customer_of(verdict.raw),
            )
            for verdict in rejected
        ]
        await asyncio.gather(*deliveries)


def envelope_records(
    events: Iterable[Publishable],
    received_at: datetime,
    partitions: Sequence[int],
    catalog_version: int = 0,
) -> list[Record]:
    """A request's events as records: one envelope per partition its customers hash to
    (more only past an envelope's limits), keyed by one of those customers, so the
    partitioner by key sends it where every customer in it belongs.  Fewer records, not
    fewer events, is what the aggregator's per-record cost asks for
    (``schemas.envelope``)."""
    numbers = tuple(partitions)
    by_partition: dict[int, dict[str, list[Publishable]]] = defaultdict(dict)
    for event in events:
        customer = event.subject
        partition = partition_of(customer.encode(), numbers)
        by_partition[partition].setdefault(customer, []).append(event)
    return [
        Record(next(iter(shares)).encode(), payload)
        for shares in by_partition.values()
        for payload in envelope.envelopes(shares.items(), received_at, catalog_version)
    ]


@functools.lru_cache(maxsize=65_536)
def partition_of(key: bytes, partitions: tuple[int, ...]) -> int:
    """The partition of ``key`` among the sorted ``partitions``, as aiokafka's default
    partitioner (Kafka's murmur2) picks it.  Cached: murmur2 runs in Python, and a busy
    customer is named in request after request."""
    return int(_PARTITIONER(key, list(partitions), list(partitions)))


def _dead_letter(verdict: Verdict, received_at: datetime, request_id: str) -> bytes:
    letter = {
        "received_at": received_at.isoformat(),
        "request_id": request_id,
        "index": verdict.index,
        "errors": [{"field": e.field, "reason": e.reason} for e in verdict.errors],
        "event": verdict.raw,
    }
    try:
        return orjson.dumps(letter, default=str)
    except TypeError:  # an integer beyond 64 bits, which orjson cannot write (rejected
        # for it, as like as not): the standard library writes any integer
        return json.dumps(letter, default=str).encode()


def _customer_of(raw: Any) -> bytes | None:
    subject = raw.get("subject") if isinstance(raw, dict) else None
    return subject.encode() if isinstance(subject, str) else None
