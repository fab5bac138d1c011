"""Backpressure: ingest refuses events while the aggregator is too far behind.

Ingest can accept faster than the aggregator counts (one process validates and publishes
~1.8x what one aggregator counts).  Without a bound the backlog in Kafka grows for as
long as the load lasts, and with it the time from a 202 to a visible count; with the
embedded in-memory broker it is also what a crash loses.  So ingest watches how far the
aggregator's consumer group is behind and, past a bound, answers 503 ``overloaded``
with ``Retry-After`` before it reads a byte of the body.  It accepts again once the lag
is back under half the bound (hysteresis: no flapping at the edge).

The lag is read from Kafka, not from the aggregator's memory: committed offsets are what
every process can see, whatever process the aggregator runs in.

**Its unit is seconds, not records.** A record is an envelope holding from 1 to
``MAX_EVENTS_PER_ENVELOPE`` events of a request (those of its customers in one partition),
so "N records behind" means anything from N to 500 N events, depending on how large the
requests are and how many partitions their customers span.  Seconds behind
— how long ago the oldest record the group has not committed was written — mean the
same for every workload and are what a user feels (the delay before a count shows).
They are estimated from offsets alone, as kafka-lag-exporter and Burrow do, without
reading records: every poll notes when each partition's end offset moved; the record at
the committed offset was written before the first poll that saw the end beyond it (so
the estimate is at most one poll short).  A group that stops consuming therefore falls
behind by one second per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import topics
from schemas.problem_types import OVERLOADED
from services.common import metrics
from services.common.logging import get_logger
from services.common.problems import Problem
from services.common.waits import surviving

log = get_logger("tally.ingest")

RESUME_FRACTION = 0.5
"""Refusing starts above the bound and stops below this share of it."""
RETRY_AFTER_MAX_SECONDS = 30
HISTORY_SAMPLES = 20_000
"""Per partition: at two polls a second, the last ~3 hours of a group that consumes nothing."""


@dataclass
class PartitionHistory:
    """When a partition's end offset was seen where: (monotonic time, end offset)."""

    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))

    def note(self, now: float, end: int) -> None:
        if not self.samples or self.samples[-1][1] != end:
            self.samples.append((now, end))

    def seconds_behind(self, now: float, committed: int) -> float:
        """How long ago the record at ``committed`` (the first one not yet counted) was
        written: since the first poll that saw the end beyond it (at most one poll
        late); 0 when the group has reached the end."""
        samples = self.samples
        if not samples or committed >= samples[-1][1]:
            return 0.0
        # forget what the group has passed: the first sample left is the first poll that
        # saw the record at ``committed`` (or, if it is older than the history, a lower
        # bound on its age)
        while samples[0][1] <= committed:
            samples.popleft()
        return now - samples[0][0]


class Backpressure:
    """Polls the consumer group's lag; ``admit`` refuses while it is over the bound."""

    def __init__(
        self, bootstrap_servers: str, group: str, max_lag_seconds: float, interval: float = 0.5
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.group = group
        self.max_lag = max_lag_seconds
        self.interval = interval
        self.lag_seconds = 0.0
        self.overloaded = False
        self._histories: dict[int, PartitionHistory] = {}

    def admit(self) -> None:
        """Raise 503 ``overloaded`` while the aggregator is too far behind."""
        if not self.overloaded:
            return
        metrics.INGEST_OVERLOADED.inc()
        wait = self.lag_seconds - self.max_lag * RESUME_FRACTION
        retry_after = max(1, min(RETRY_AFTER_MAX_SECONDS, math.ceil(wait)))
        raise Problem(
            OVERLOADED,
            f"the aggregator is {self.lag_seconds:.1f} s behind (the bound is"
            f" {self.max_lag:g} s): nothing was read or accepted; retry after"
            f" {retry_after} s",
            headers={"Retry-After": str(retry_after)},
            lag_seconds=round(self.lag_seconds, 1),
        )

    def observe(self, now: float, ends: dict[int, int], committed: dict[int, int]) -> float:
        """Take one poll's offsets; the lag in seconds, the state updated from it.
        ``committed`` empty: the group has never committed (no aggregator yet), so there
        is nothing to be behind of."""
        lag = 0.0
        for partition, end in ends.items():
            history = self._histories.setdefault(partition, PartitionHistory())
            history.note(now, end)
            if committed:
                lag = max(lag, history.seconds_behind(now, committed.get(partition, 0)))
        self.lag_seconds = lag
        metrics.INGEST_CONSUMER_LAG_SECONDS.set(lag)
        metrics.INGEST_CONSUMER_LAG_RECORDS.set(
            sum(max(0, end - committed.get(p, end)) for p, end in ends.items())
        )
        if not self.overloaded and lag > self.max_lag:
            self.overloaded = True
            log.warning("refusing events: the aggregator is behind", lag_seconds=round(lag, 1))
        elif self.overloaded and lag < self.max_lag * RESUME_FRACTION:
            self.overloaded = False
            log.info("accepting events again", lag_seconds=round(lag, 1))
        return lag

    async def run(self) -> None:
        """Poll for as long as the process serves; a failed poll keeps the last state
        (a broker that is down is answered by the publish timeout, not here).  Clients
        that cannot start (a broker not up yet) are tried again: the watch must not end
        with the process still serving."""
        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers)
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
            again = "consumer lag not watched; trying again"
            with surviving(log, again, level="warning"):
                try:
                    await consumer.start()
                    await admin.start()
                    while True:
                        # the next poll tries again
                        with surviving(log, "consumer lag not read", level="warning"):
                            await self.poll(consumer, admin)
                        await asyncio.sleep(self.interval)
                finally:
                    with contextlib.suppress(Exception):
                        await admin.close()
                    with contextlib.suppress(Exception):
                        await consumer.stop()
            await asyncio.sleep(max(self.interval, 1.0))

    async def poll(self, consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient) -> None:
        partitions = [
            TopicPartition(topics.EVENTS, p)
            for p in consumer.partitions_for_topic(topics.EVENTS) or ()
        ]
        if not partitions:
            return
        offsets = await admin.list_consumer_group_offsets(self.group, partitions=partitions)
        committed = {
            tp.partition: meta.offset
            for tp, meta in offsets.items()
            if tp.topic == topics.EVENTS and meta.offset >= 0
        }
        # a partition the group never committed is behind from its first record
        missing = [tp for tp in partitions if tp.partition not in committed]
        if committed and missing:
            firsts = await consumer.beginning_offsets(missing)
            committed |= {tp.partition: offset for tp, offset in firsts.items()}
        ends = await consumer.end_offsets(partitions)
        self.observe(time.monotonic(), {tp.partition: o for tp, o in ends.items()}, committed)
