"""The aggregator's batch processor against real Redis and ClickHouse (chDB or server).

Replays, client retries, zombie writers and unreadable records: the counters and the
raw rows must come out exactly once each.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from schemas import envelope, redis_keys
from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, from_micros, utcnow
from schemas.windows import Window, bucket_id
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.increments import CounterOps
from services.aggregator.processor import BatchProcessor, Record
from services.aggregator.redis_sink import Apply, Outcome, RedisSink
from services.aggregator.worker import dead_letter_message
from services.common import clickhouse
from services.common.clickhouse import ClickHouse, ClickHouseError
from services.common.settings import Settings

TOPIC = "tally.events"


@pytest.fixture
def dead_letters() -> list[tuple[Record, str]]:
    return []


@pytest.fixture
def processor(
    ch: ClickHouse,
    redis: Redis,
    meters: dict[str, list[Meter]],
    dead_letters: list[tuple[Record, str]],
    settings: Settings,
) -> BatchProcessor:
    async def dead_letter(record: Record, reason: str) -> None:
        dead_letters.append((record, reason))

    return BatchProcessor(
        ClickHouseSink(ch),
        RedisSink(redis),
        lambda: meters,
        DedupeWindow(timedelta(hours=24)),
        dead_letter,
        incarnation=settings.kafka_incarnation,
    )


def stored(customer: str, kind: str, ident: str, value: str = "1", **dims: str) -> StoredEvent:
    now = utcnow()
    return StoredEvent(ident, "src", kind, customer, now, Decimal(value), dims, now)


def record(offset: int, *events: StoredEvent, partition: int = 0) -> Record:
    customer = events[0].customer
    return Record(TOPIC, partition, offset, envelope.encode(customer, events, utcnow()))


def shared(offset: int, *events: StoredEvent, partition: int = 0) -> Record:
    """A record of several customers' events (envelope version 2), as ingest writes."""
    by_customer: dict[str, list[StoredEvent]] = {}
    for event in events:
        by_customer.setdefault(event.customer, []).append(event)
    payload = envelope.encode_shares(by_customer.items(), utcnow())
    return Record(TOPIC, partition, offset, payload)


async def day_counter(redis: Redis, customer: str, meter: str, field: str = "*") -> Decimal:
    key = redis_keys.counters(customer, meter, Window.DAY, bucket_id(Window.DAY, utcnow()))
    raw = await redis.hget(key, field)
    return from_micros(int(raw or 0))


def raw_rows(ch: ClickHouse, customer: str) -> int:
    rows = ch.query(
        f"SELECT count() FROM {ch.database}.events FINAL WHERE customer = {{c:String}}",
        {"c": customer},
    )
    return int(rows[0][0])


async def test_a_replayed_batch_changes_nothing(
    processor: BatchProcessor, redis: Redis, ch: ClickHouse, tenant: str
) -> None:
    customer = f"{tenant}-a"
    batch = [
        record(10, stored(customer, "api_call", "1", endpoint="/a")),
        record(
            11,
            stored(customer, "compute", "2", "1.25"),
            stored(customer, "compute", "3", "0.000001"),
        ),
    ]
    await processor.process(batch)
    await processor.process(batch)  # as after a crash before the offset commit
    assert await day_counter(redis, customer, "api_calls") == 1
    assert await day_counter(redis, customer, "compute_seconds") == Decimal("1.250001")
    assert raw_rows(ch, customer) == 3


async def test_a_client_retry_in_a_later_record_counts_once(
    processor: BatchProcessor, redis: Redis, ch: ClickHouse, tenant: str
) -> None:
    customer = f"{tenant}-b"
    first = stored(customer, "api_call", "same", endpoint="/a")
    await processor.process([record(1, first)])
    await processor.process([record(2, first, stored(customer, "api_call", "new", endpoint="/b"))])
    assert await day_counter(redis, customer, "api_calls") == 2
    assert await day_counter(redis, customer, "api_calls", '["/b"]') == 1
    assert raw_rows(ch, customer) == 2


async def test_max_latest_and_unique_count(
    processor: BatchProcessor, redis: Redis, tenant: str
) -> None:
    customer = f"{tenant}-c"
    storage = [stored(customer, "storage", str(i), v) for i, v in enumerate(["5", "120.5", "7"])]
    users = [stored(customer, "user", f"u{i}", user=u) for i, u in enumerate(["a", "b", "a", "c"])]
    await processor.process([record(1, *storage), record(2, *users)])
    await processor.process([record(3, stored(customer, "user", "u9", user="d"))])
    assert await day_counter(redis, customer, "storage_gb") == Decimal("120.5")
    assert await day_counter(redis, customer, "active_users") == 4


async def test_records_at_or_below_the_applied_offset_are_skipped(
    processor: BatchProcessor, redis: Redis, settings: Settings, tenant: str
) -> None:
    customer = f"{tenant}-d"
    field = redis_keys.offset_field(TOPIC, 0, settings.kafka_incarnation)
    await processor.process([record(5, stored(customer, "api_call", "x", endpoint="/a"))])
    assert await redis.hget(redis_keys.offsets(customer), field) == b"5"
    await processor.process(
        [
            record(4, stored(customer, "api_call", "older", endpoint="/a")),
            record(6, stored(customer, "api_call", "newer", endpoint="/a")),
        ]
    )
    assert await day_counter(redis, customer, "api_calls") == 2
    assert await redis.hget(redis_keys.offsets(customer), field) == b"6"


async def test_offsets_of_a_topic_s_earlier_life_never_hide_its_new_records(
    ch: ClickHouse,
    redis: Redis,
    meters: dict[str, list[Meter]],
    settings: Settings,
    tenant: str,
) -> None:
    """The topic is recreated: its offsets start again at 0, under a new topic id."""
    customer = f"{tenant}-r"
    lives = ["first-life"]

    async def topic_ids(names: Sequence[str]) -> dict[str, str]:
        return dict.fromkeys(names, lives[-1])

    def worker() -> BatchProcessor:
        return BatchProcessor(
            ClickHouseSink(ch),
            RedisSink(redis),
            lambda: meters,
            DedupeWindow(timedelta(hours=24)),
            dead_letter=_no_dead_letters,
            incarnation=settings.kafka_incarnation,
            topic_ids=topic_ids,
        )

    def call(ident: str) -> StoredEvent:
        return stored(customer, "api_call", ident, endpoint="/a")

    processor = worker()
    await processor.process([record(7, call("1")), record(8, call("2"))])
    lives.append("second-life")
    # Record 9 was fetched before the topic went: it follows on from 8 and keeps the
    # first life.  Records 0 and 1 are the new topic's, read from its start.
    await processor.process([record(9, call("3")), record(0, call("4")), record(1, call("5"))])
    assert await day_counter(redis, customer, "api_calls") == 5
    offsets = await redis.hgetall(redis_keys.offsets(customer))
    first, second = (f"{settings.kafka_incarnation}:{life}" for life in lives)
    assert offsets == {
        redis_keys.offset_field(TOPIC, 0, first).encode(): b"9",
        redis_keys.offset_field(TOPIC, 0, second).encode(): b"1",
    }
    # A restarted aggregator on the same topic still skips what was applied: an event
    # it has never seen, at an applied offset, can only be a replay.
    await worker().process([record(1, call("never-seen")), record(2, call("6"))])
    assert await day_counter(redis, customer, "api_calls") == 6


async def _no_dead_letters(record: Record, reason: str) -> None:
    raise AssertionError(f"dead-lettered {record}: {reason}")


async def test_a_stale_writer_is_refused_atomically(redis: Redis, tenant: str) -> None:
    customer = f"{tenant}-e"
    sink = RedisSink(redis)
    key = redis_keys.counters(customer, "api_calls", Window.DAY, "20261121")
    ops = CounterOps()
    ops.sums[(key, "*")] = 1_000_000
    ops.expiry[key] = int(utcnow().timestamp()) + 600
    seen = [redis_keys.seen(customer, "2"), redis_keys.seen(customer, "1")]
    expires = int(utcnow().timestamp()) + 600
    share = Apply(customer, "t/0", None, 7, seen, expires, [b"d" * 8], ops)
    assert await sink.apply([share]) == [(Outcome.APPLIED, set(), 0)]
    stale = Apply(customer, "t/0", 3, 9, seen, expires, [b"e" * 8], ops)
    assert await sink.apply([stale]) == [(Outcome.OFFSET_MOVED, set(), 0)]
    assert await redis.hget(key, "*") == b"1000000"
    assert not await redis.sismember(seen[0], "e" * 8)
    assert await redis.hget(redis_keys.offsets(customer), "t/0") == b"7"


async def test_already_seen_digests_are_named_and_nothing_is_applied(
    redis: Redis, tenant: str
) -> None:
    customer = f"{tenant}-h"
    sink = RedisSink(redis)
    older, current = redis_keys.seen(customer, "1"), redis_keys.seen(customer, "2")
    await redis.sadd(older, b"o" * 8)
    key = redis_keys.counters(customer, "api_calls", Window.DAY, "20261121")
    ops = CounterOps()
    ops.sums[(key, "*")] = 2_000_000
    ops.expiry[key] = int(utcnow().timestamp()) + 600
    expires = int(utcnow().timestamp()) + 600
    share = Apply(customer, "t/0", None, 4, [current, older], expires, [b"n" * 8, b"o" * 8], ops)
    assert await sink.apply([share]) == [(Outcome.DUPLICATES, {b"o" * 8}, 0)]
    assert not await redis.exists(key)
    assert await redis.hget(redis_keys.offsets(customer), "t/0") is None


async def test_a_share_of_thousands_of_events_is_checked_and_marked_whole(
    redis: Redis, tenant: str
) -> None:
    """The script takes digests a thousand at a time: repeats in any chunk and any live
    set are found, and every digest of an applied share is marked seen."""
    customer = f"{tenant}-k"
    sink = RedisSink(redis)
    older, current = redis_keys.seen(customer, "1"), redis_keys.seen(customer, "2")
    digests = [n.to_bytes(8, "big") for n in range(2_500)]
    await redis.sadd(older, digests[1_999])
    await redis.sadd(current, digests[7], digests[2_400])
    key = redis_keys.counters(customer, "api_calls", Window.DAY, "20261121")
    ops = CounterOps()
    ops.sums[(key, "*")] = 2_500_000_000
    ops.expiry[key] = int(utcnow().timestamp()) + 600
    expires = int(utcnow().timestamp()) + 600
    share = Apply(customer, "t/0", None, 4, [current, older], expires, digests, ops)
    repeats = {digests[7], digests[1_999], digests[2_400]}
    assert await sink.apply([share]) == [(Outcome.DUPLICATES, repeats, 0)]
    assert not await redis.exists(key)

    await redis.delete(older, current)
    assert await sink.apply([share]) == [(Outcome.APPLIED, set(), 0)]
    assert await redis.smismember(current, digests) == [1] * len(digests)
    assert await redis.hget(key, "*") == b"2500000000"
    assert 0 < await redis.ttl(current) <= 600


async def test_the_reservations_a_share_closes_are_released_in_every_chunk(
    redis: Redis, tenant: str
) -> None:
    """Reservations are looked up a thousand digests at a time: one named in any chunk is
    released (its units leave what is held; it leaves the hash and the expiries), while a
    reservation no event names and a lease's record stay as they were."""
    customer = f"{tenant}-r"
    sink = RedisSink(redis)
    reservations = redis_keys.reservations(customer)
    expiries = redis_keys.reservation_expiries(customer)
    held = redis_keys.held(customer)
    digests = [n.to_bytes(8, "big") for n in range(2_500)]
    closed = [digests[0], digests[999], digests[1_000], digests[2_499]]
    waiting, lease = (2_500).to_bytes(8, "big"), b"ls_AAAAAAAAAAAAAAAA"
    record = {d: f"api_calls|{2 * VALUE_SCALE}" for d in [*closed, waiting]}
    record[lease] = f"api_calls|{5 * VALUE_SCALE}|5|1|1"
    await redis.hset(reservations, mapping=record)  # type: ignore[arg-type]
    deadline = int(utcnow().timestamp() * 1000) + 60_000
    await redis.zadd(expiries, dict.fromkeys(record, deadline))
    await redis.hset(held, "api_calls", 15 * VALUE_SCALE)
    key = redis_keys.counters(customer, "api_calls", Window.DAY, "20261121")
    ops = CounterOps()
    ops.sums[(key, "*")] = 2_500 * VALUE_SCALE
    ops.expiry[key] = int(utcnow().timestamp()) + 600
    seen = [redis_keys.seen(customer, "2"), redis_keys.seen(customer, "1")]
    share = Apply(customer, "t/0", None, 4, seen, int(utcnow().timestamp()) + 600, digests, ops)
    assert await sink.apply([share]) == [(Outcome.APPLIED, set(), 0)]
    assert await redis.hget(held, "api_calls") == str(7 * VALUE_SCALE).encode()
    assert set(await redis.hkeys(reservations)) == {waiting, lease}
    assert set(await redis.zrange(expiries, 0, -1)) == {waiting, lease}
    assert await redis.hget(reservations, lease) == record[lease].encode()


async def test_an_unreadable_record_goes_to_the_dead_letters_and_the_rest_is_counted(
    processor: BatchProcessor,
    redis: Redis,
    dead_letters: list[tuple[Record, str]],
    tenant: str,
) -> None:
    customer = f"{tenant}-f"
    garbage = Record(TOPIC, 0, 1, b"\x00not an envelope")
    await processor.process([garbage, record(2, stored(customer, "api_call", "ok", endpoint="/a"))])
    assert [r for r, _ in dead_letters] == [garbage]
    assert "undecodable envelope" in dead_letters[0][1]
    assert await day_counter(redis, customer, "api_calls") == 1


async def test_old_events_skip_expired_minute_buckets_but_count_in_the_day(
    processor: BatchProcessor, redis: Redis, tenant: str
) -> None:
    customer = f"{tenant}-g"
    old = utcnow() - timedelta(hours=5)
    event = StoredEvent(
        "old", "src", "api_call", customer, old, Decimal(1), {"endpoint": "/a"}, utcnow()
    )
    await processor.process([record(1, event)])
    minute = redis_keys.counters(
        customer, "api_calls", Window.MINUTE, bucket_id(Window.MINUTE, old)
    )
    day = redis_keys.counters(customer, "api_calls", Window.DAY, bucket_id(Window.DAY, old))
    assert not await redis.exists(minute)
    assert await redis.hget(day, "*") == b"1000000"
    assert 0 < await redis.ttl(day) <= 41 * 86400


async def test_one_customer_from_two_partitions_in_one_batch(
    processor: BatchProcessor, redis: Redis, tenant: str
) -> None:
    """After partitions are added, a customer's records may come from two partitions."""
    customer = f"{tenant}-p"
    calls = [stored(customer, "api_call", str(i), endpoint="/a") for i in range(4)]
    await processor.process([record(3, calls[0], partition=5), record(1000, calls[1], partition=0)])
    await processor.process([record(4, calls[2], partition=5), record(5, calls[3], partition=5)])
    assert await day_counter(redis, customer, "api_calls") == 4


async def test_a_counter_overflow_dead_letters_the_share_and_moves_on(
    processor: BatchProcessor,
    redis: Redis,
    ch: ClickHouse,
    dead_letters: list[tuple[Record, str]],
    tenant: str,
) -> None:
    huge, other = f"{tenant}-big", f"{tenant}-ok"
    big = [stored(huge, "compute", str(i), "999999999999") for i in range(10)]
    batch = [record(1, *big), record(2, stored(other, "compute", "x", "1.5"))]
    await processor.process(batch)
    assert [reason for _, reason in dead_letters] == [
        "counter overflow: a sum would pass 9e12 units"
    ]
    assert await day_counter(redis, huge, "compute_seconds") == 0
    assert await day_counter(redis, other, "compute_seconds") == Decimal("1.5")
    assert raw_rows(ch, huge) == 10  # the record keeps them
    await processor.process([record(3, stored(huge, "compute", "y", "2"))])
    assert await day_counter(redis, huge, "compute_seconds") == 2


async def test_a_record_of_two_customers_half_applied_before_a_crash_counts_once(
    processor: BatchProcessor, redis: Redis, ch: ClickHouse, tenant: str
) -> None:
    """Each customer's share of a record is its own Lua call: a crash between the two
    leaves one customer's offset past the record and not the other's.  The replay
    counts the other one only."""
    a, b = f"{tenant}-sa", f"{tenant}-sb"
    of_a = [stored(a, "api_call", "1"), stored(a, "api_call", "2")]
    of_b = [stored(b, "api_call", "3")]
    await processor.process([record(20, *of_a)])  # a's share of offset 20 was applied
    both = shared(20, of_a[0], of_b[0], of_a[1])
    await processor.process([both, shared(21, stored(b, "api_call", "4"))])
    await processor.process([both])
    assert await day_counter(redis, a, "api_calls") == 2
    assert await day_counter(redis, b, "api_calls") == 2
    assert (raw_rows(ch, a), raw_rows(ch, b)) == (2, 2)


async def test_an_overflow_dead_letters_only_its_customers_events_of_a_shared_record(
    processor: BatchProcessor, redis: Redis, dead_letters: list[tuple[Record, str]], tenant: str
) -> None:
    huge, other = f"{tenant}-big2", f"{tenant}-ok2"
    big = [stored(huge, "compute", str(i), "999999999999") for i in range(10)]
    await processor.process([shared(1, *big, stored(other, "compute", "x", "1.5"))])
    [(letter, _)] = dead_letters
    [(customer, events)] = envelope.decode_shares(letter.value)
    assert (customer, [e.id for e in events]) == (huge, [e.id for e in big])
    assert await day_counter(redis, other, "compute_seconds") == Decimal("1.5")


async def test_a_batch_counted_while_its_insert_failed_is_inserted_not_counted_on_retry(
    processor: BatchProcessor, redis: Redis, ch: ClickHouse, tenant: str
) -> None:
    """Redis counts a batch before its rows go into ClickHouse: it may have counted one
    whose insert failed.  The retry inserts it and counts nothing again."""
    customer = f"{tenant}-ch"
    batch = [record(1, stored(customer, "api_call", "1"), stored(customer, "api_call", "2"))]
    ch.command(f"RENAME TABLE {ch.database}.events TO {ch.database}.events_away")
    try:
        with pytest.raises(ClickHouseError):
            await processor.process(batch)
    finally:
        ch.command(f"RENAME TABLE {ch.database}.events_away TO {ch.database}.events")
    assert await day_counter(redis, customer, "api_calls") == 2
    assert raw_rows(ch, customer) == 0
    await processor.process(batch)
    assert await day_counter(redis, customer, "api_calls") == 2
    assert raw_rows(ch, customer) == 2


def test_dead_letters_stay_under_the_message_limit() -> None:
    quoted = Record(TOPIC, 3, 9, b'"\\' * 400_000)
    letter = orjson.loads(dead_letter_message(quoted, "undecodable envelope"))
    assert letter == {
        "reason": "undecodable envelope",
        "topic": TOPIC,
        "partition": 3,
        "offset": 9,
        "value_bytes": 800_000,
    }
    small = orjson.loads(dead_letter_message(Record(TOPIC, 0, 1, b"{oops"), "bad"))
    assert small["value"] == "{oops"


def test_an_events_table_of_another_layout_is_refused(settings: Settings, tmp_path: Path) -> None:
    client = clickhouse.connect(settings.model_copy(update={"data_dir": tmp_path / "old"}))
    try:
        client.command(f"CREATE DATABASE IF NOT EXISTS {client.database}")
        client.command(
            f"CREATE TABLE {client.database}.events (customer String, id String)"
            " ENGINE = ReplacingMergeTree ORDER BY (customer, id)"
        )
        with pytest.raises(ClickHouseError, match="migrate the table"):
            clickhouse.create_schema(client)
    finally:
        client.command(f"DROP TABLE IF EXISTS {client.database}.events")
        client.close()
