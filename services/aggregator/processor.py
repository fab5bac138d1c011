"""One batch of Kafka records through the sinks, with an exactly-once effect.

A batch is counted in Redis as it comes, and its rows join those gathered for
ClickHouse (``services.aggregator.gathering``: one insert for several batches, made in
a thread while the next batches are counted); only once both have it may the caller
acknowledge the records, which ``store``'s ``settled`` callback tells.  Each sink is
idempotent on its own (ClickHouse by event key, Redis by offset), so a crash at any
moment replays the batch and the replay changes nothing either had applied: a batch
counted in Redis but not yet in ClickHouse is inserted again (every event of the batch
is), one in ClickHouse but not in Redis is counted.  A count never waits for an insert.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from schemas import envelope, redis_keys
from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.events import utcnow
from services.aggregator import increments
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.gathering import Gathering, Settled
from services.aggregator.redis_sink import Apply, Outcome, RedisSink
from services.common import metrics
from services.common.collector import collector_paused
from services.common.logging import get_logger
from services.common.meter_cache import MeterCache
from services.common.zone_book import ZoneOf, in_utc

log = get_logger("tally.aggregator")


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes


DeadLetter = Callable[[Record, str], Awaitable[None]]
Alerting = Callable[[set[str]], None]
"""Names the customers whose alert crossings were queued, for publishing without waiting
for it (``AlertPublisher.wake`` in ``services.aggregator.alerts``)."""
TopicIds = Callable[[Sequence[str]], Awaitable[dict[str, str]]]
"""The current id of each named topic (``services.common.topic_ids``), "" for none."""


@dataclass(slots=True)
class _Share:
    """One customer's records from one partition in a batch: what one Lua call applies."""

    customer: str
    offset_field: str
    records: list[tuple[Record, list[StoredEvent]]] = field(default_factory=list)
    seen: set[bytes] = field(default_factory=set)  # digests Redis says are already counted
    overflowed: bool = False  # its counters would overflow: skip its events, keep going


@dataclass(frozen=True, slots=True)
class Batch:
    records: Sequence[Record]
    shares: list[_Share]


class BatchProcessor:
    def __init__(
        self,
        clickhouse: ClickHouseSink,
        redis: RedisSink,
        meters: Callable[[], dict[str, list[Meter]]],
        dedupe: DedupeWindow,
        dead_letter: DeadLetter,
        incarnation: str = "",
        topic_ids: TopicIds | None = None,
        alerting: Alerting | None = None,
        catalog: MeterCache | None = None,
        zone_of: ZoneOf = in_utc,
        insert_rows: int = 20_000,
        insert_seconds: float = 2.0,
    ) -> None:
        """``catalog``, when given, is the cache ``meters`` reads: its versions decide
        which events a new meter counts live, and an event stamped with a newer version
        than it holds makes it reload before counting (``_catalog_for``).  ``zone_of``:
        each customer's billing zone, whose months its quotas count.  ``insert_rows``
        and ``insert_seconds``: when ``keep_inserting`` inserts the rows gathered."""
        self._catalog = catalog
        self._zone_of = zone_of
        self._incarnation = incarnation
        self._tell_alerting = alerting
        # customers whose alert crossings wait to be published (told once the batch is in)
        self._alerting: set[str] = set()
        self._topic_ids = topic_ids
        # per (topic, partition): the last offset decoded and the life it belonged to
        self._lives: dict[tuple[str, int], tuple[int, str]] = {}
        self._gathering = Gathering(clickhouse, insert_rows, insert_seconds)
        self._redis = redis
        self._meters = meters
        self._dedupe = dedupe
        self._dead_letter = dead_letter
        self.positions: dict[tuple[str, int], int] = {}

    async def process(self, records: Sequence[Record]) -> None:
        """Decode, store and insert ``records``: in both sinks when it returns."""
        await self.store(await self.decode(records))
        await self.flush()

    async def store(self, batch: Batch, settled: Settled | None = None) -> None:
        """Count a decoded batch in Redis and gather its rows for ClickHouse; safe to
        call again after a failure.  ``settled`` runs once its rows are in ClickHouse
        too (``flush``, or ``keep_inserting`` in the background)."""
        events = [e for share in batch.shares for _, evs in share.records for e in evs]
        metrics.AGGREGATOR_BATCH_RECORDS.observe(len(batch.records))
        metrics.AGGREGATOR_BATCH_EVENTS.observe(len(events))
        with collector_paused(), metrics.SINK_SECONDS.labels("redis").time():
            await self._apply(batch.shares, utcnow())
        if self._tell_alerting is not None and self._alerting:
            self._tell_alerting(self._alerting)
            self._alerting = set()
        await self._gathering.add(events, settled)  # may wait for room: collecting meanwhile
        for record in batch.records:
            self.positions[(record.topic, record.partition)] = record.offset

    async def flush(self) -> None:
        """Insert the rows gathered so far (raises what the insert raised)."""
        await self._gathering.flush()

    def hurry(self) -> None:
        """Gather no longer: insert what waits, then each batch's rows as they come."""
        self._gathering.hurry()

    def insert_soon(self) -> None:
        """Insert what waits now (a rebalance is starting)."""
        self._gathering.insert_soon()

    async def keep_inserting(self) -> None:
        """Insert the rows gathered, in the background, for as long as it runs."""
        await self._gathering.run()

    async def decode(self, records: Sequence[Record]) -> Batch:
        """Group records into shares; unreadable ones go to the dead-letter topic."""
        with collector_paused():
            return Batch(records, await self._decode(records))

    async def _decode(self, records: Sequence[Record]) -> list[_Share]:
        shares: dict[tuple[str, str], _Share] = {}
        lives = await self._incarnations(records)
        for record, life in zip(records, lives, strict=True):
            try:
                by_customer = envelope.decode_shares(record.value)
            except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
                await self._dead_letter(record, f"undecodable envelope: {exc!r}")
                continue
            field_ = redis_keys.offset_field(record.topic, record.partition, life)
            for customer, events in by_customer:
                if events:  # a record of several customers is in each one's share
                    share = shares.setdefault((customer, field_), _Share(customer, field_))
                    share.records.append((record, events))
        return list(shares.values())

    async def _incarnations(self, records: Sequence[Record]) -> list[str]:
        """The incarnation each record's applied offsets are kept under: the configured
        one (``TALLY_KAFKA_INCARNATION``) joined with its topic's id.

        A recreated topic starts its offsets again at 0; keyed by the topic's id, the
        offsets applied from its previous life never make a new record look like a
        replay.  Within one life a partition's offsets run on by one (Tally writes no
        transactions), so the id is asked for only where they do not: the first record
        of a partition, a rewind (a replay, or a new life read from its start) and a gap
        (the partition comes back from another worker).  It is asked after those records
        were fetched, so it names their topic's life; records fetched earlier and still in
        hand follow on from the ones before them and keep the old life.  A restart of the
        aggregator finds the same id and still skips what it had applied.
        """
        if self._topic_ids is None:
            return [self._incarnation] * len(records)
        breaks = self._breaks(records)
        asked = sorted({r.topic for r, broken in zip(records, breaks, strict=True) if broken})
        ids = await self._topic_ids(asked) if asked else {}
        lives = []
        for record, broken in zip(records, breaks, strict=True):
            where = (record.topic, record.partition)
            if broken:
                life = ":".join(p for p in (self._incarnation, ids[record.topic]) if p)
                if life != self._lives.get(where, (0, None))[1]:
                    log.info("topic life", topic=where[0], partition=where[1], life=life)
            else:
                life = self._lives[where][1]
            self._lives[where] = (record.offset, life)
            lives.append(life)
        return lives

    def _breaks(self, records: Sequence[Record]) -> list[bool]:
        """Which records do not follow on from the one before them in their partition."""
        last = {where: offset for where, (offset, _) in self._lives.items()}
        breaks = []
        for record in records:
            where = (record.topic, record.partition)
            breaks.append(last.get(where, -2) + 1 != record.offset)
            last[where] = record.offset
        return breaks

    async def _catalog_for(self, shares: list[_Share]) -> dict[str, int]:
        """Each meter's first catalog version counted live, once the meters held are at
        least as new as every event's stamp: ingest saw a meter this process has not yet
        heard of only if its change notification is still on the way."""
        if self._catalog is None:
            return {}
        newest = max(
            (e.catalog_version for s in shares for _, evs in s.records for e in evs), default=0
        )
        index = self._catalog.current()
        if index is None or newest > index.version:
            await self._catalog.refresh()
            index = self._catalog.current()
        return index.counting_from if index is not None else {}

    async def _apply(self, shares: list[_Share], now: datetime) -> None:
        """Send every share; re-plan the ones Redis refused, until none is refused."""
        counting_from = await self._catalog_for(shares)
        meters = self._meters()
        pending = shares
        while pending:
            stored = await self._redis.stored_offsets(
                [(s.customer, s.offset_field) for s in pending]
            )
            planned = []
            for share, offset in zip(pending, stored, strict=True):
                if plan := self._plan(share, offset, meters, counting_from, now):
                    planned.append((share, plan))
                else:  # a replay: what a crash left unpublished is drained with it
                    self._alerting.add(share.customer)
            replies = await self._redis.apply([plan for _, plan in planned])
            pending = []
            for (share, plan), (outcome, seen, crossings) in zip(planned, replies, strict=True):
                if crossings:
                    self._alerting.add(share.customer)
                if outcome is Outcome.APPLIED:
                    metrics.REPLAYED_RECORDS.inc(plan.replayed)
                    metrics.AGGREGATED_EVENTS.labels("counted").inc(len(plan.digests))
                    metrics.AGGREGATED_EVENTS.labels("duplicate").inc(
                        plan.events - len(plan.digests)
                    )
                    continue
                if outcome is Outcome.OFFSET_MOVED:
                    log.warning("offset moved under us; recomputing", customer=share.customer)
                elif outcome is Outcome.OVERFLOW:
                    await self._overflowed(share, plan.expected)
                share.seen |= seen
                pending.append(share)

    async def _overflowed(self, share: _Share, applied: int | None) -> None:
        """A counter would pass 2^63 micro-units: these events cannot be counted in Redis.

        They stay in ClickHouse (the record, which rollups and billing read); here they
        go to the dead-letter topic, and the offset moves on so the partition does not
        stall.
        """
        log.error("counter overflow; events dead-lettered", customer=share.customer)
        for record, events in share.records:
            if applied is None or record.offset > applied:
                metrics.AGGREGATED_EVENTS.labels("overflow").inc(len(events))
                await self._dead_letter(
                    _only(record, share.customer, events),
                    "counter overflow: a sum would pass 9e12 units",
                )
        share.overflowed = True

    def _plan(
        self,
        share: _Share,
        stored: int | None,
        meters: dict[str, list[Meter]],
        counting_from: dict[str, int],
        now: datetime,
    ) -> Apply | None:
        fresh = [(r.offset, evs) for r, evs in share.records if stored is None or r.offset > stored]
        if not fresh:
            metrics.REPLAYED_RECORDS.inc(len(share.records))
            return None
        candidates = [] if share.overflowed else [e for _, evs in fresh for e in evs]
        digests = [redis_keys.event_digest(e.source, e.id) for e in candidates]
        new_events, new_digests = _first_sightings(candidates, digests, share.seen)
        bucket = self._dedupe.current(now)
        customer = share.customer
        return Apply(
            customer=customer,
            offset_field=share.offset_field,
            expected=stored,
            new_offset=max(o for o, _ in fresh),
            seen_keys=[self._dedupe.key(customer, b) for b in self._dedupe.live(now)],
            seen_expires_at=self._dedupe.expires_at(bucket),
            digests=new_digests,
            ops=increments.build(
                customer, new_events, meters, now, counting_from, self._zone_of(customer)
            ),
            events=len(candidates),
            replayed=len(share.records) - len(fresh),
        )


def _only(record: Record, customer: str, events: list[StoredEvent]) -> Record:
    """``record`` with only ``customer``'s events: the other customers of an envelope
    were counted, and a dead letter holds what was not."""
    payload = envelope.encode_shares([(customer, events)], events[0].received_at)
    return Record(record.topic, record.partition, record.offset, payload)


def _first_sightings(
    events: list[StoredEvent], digests: list[bytes], already: set[bytes]
) -> tuple[list[StoredEvent], list[bytes]]:
    seen = set(already)
    kept_events, kept_digests = [], []
    for event, key in zip(events, digests, strict=True):
        if key in seen:
            continue
        seen.add(key)
        kept_events.append(event)
        kept_digests.append(key)
    return kept_events, kept_digests
