"""Alert thresholds evaluated by the aggregator's batch call (``apply_batch.lua``).

A property drives random sequences of increments — with replays of the last batch and
client retries of its events mixed in — through the real sink against a naive model:
after each batch the crossings queued are exactly the highest threshold newly reached
(none when none is), and no threshold ever fires twice in a month.  Examples check the
month rollover, the publisher (stable ids, payloads, drain after a crash between
publish and trim) and that a customer without thresholds queues nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.alerts import PLAN_RULE, AlertKind, Threshold, encode, parse_crossing
from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, utcnow
from schemas.notifications import STREAM, NotificationType, notification_id
from schemas.windows import Window, bucket_id
from services.aggregator import increments
from services.aggregator.alerts import AlertPublisher, notification
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.redis_sink import Apply, Outcome, RedisSink
from tests.conftest import REDIS_URL
from tests.lease_support import catalog_meters

METER = "api_calls"
METERS = catalog_meters()
_ids = itertools.count()


def calls(customer: str, n: int, at: datetime | None = None) -> list[StoredEvent]:
    when = at or utcnow()
    return [
        StoredEvent(f"e{next(_ids)}", "src", "api_call", customer, when, Decimal(1), {}, when)
        for _ in range(n)
    ]


class Feed:
    """One customer's partition as the aggregator applies it: offset by offset."""

    def __init__(
        self,
        redis: Redis,
        customer: str,
        meters: dict[str, list[Meter]],
        tz: ZoneInfo | None = None,
    ) -> None:
        self.sink, self.customer, self.meters, self.tz = RedisSink(redis), customer, meters, tz
        self.field = redis_keys.offset_field("tally.events", 0, "alert-tests")
        self.dedupe = DedupeWindow(timedelta(hours=24))

    async def send(self, events: list[StoredEvent], offset: int | None = None) -> Outcome:
        now = utcnow()
        [stored] = await self.sink.stored_offsets([(self.customer, self.field)])
        expected = stored if offset is None else (offset - 1 if offset else None)
        plan = Apply(
            customer=self.customer,
            offset_field=self.field,
            expected=expected,
            new_offset=(stored + 1 if stored is not None else 0) if offset is None else offset,
            seen_keys=[self.dedupe.key(self.customer, b) for b in self.dedupe.live(now)],
            seen_expires_at=self.dedupe.expires_at(self.dedupe.current(now)),
            digests=[redis_keys.event_digest(e.source, e.id) for e in events],
            ops=increments.build(self.customer, events, self.meters, now, tz=self.tz),
        )
        [(outcome, _, _)] = await self.sink.apply([plan])
        return outcome


async def take_out(redis: Redis, customer: str) -> list[str]:
    key = redis_keys.alerts_out(customer)
    raw: Any = await redis.lrange(key, 0, -1)
    await redis.delete(key)
    return [r.decode() for r in raw]


async def set_levels(redis: Redis, customer: str, levels: list[int]) -> None:
    thresholds = [Threshold(q * VALUE_SCALE, AlertKind.USAGE, Decimal(q), "r1") for q in levels]
    await redis.hset(redis_keys.alerts(customer), METER, encode(thresholds))


step = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40)),
    st.tuples(st.just("replay"), st.just(0)),
    st.tuples(st.just("retry"), st.just(0)),
)


@settings(max_examples=80, deadline=None)
@given(
    levels=st.lists(st.integers(1, 200), min_size=1, max_size=10, unique=True),
    steps=st.lists(step, max_size=25),
)
def test_crossings_match_the_naive_model(levels: list[int], steps: list[tuple[str, int]]) -> None:
    asyncio.run(_run_model(levels, steps))


async def _run_model(levels: list[int], steps: list[tuple[str, int]]) -> None:
    redis = Redis.from_url(REDIS_URL)
    customer = f"p{uuid.uuid4().hex[:10]}"
    try:
        await set_levels(redis, customer, levels)
        feed = Feed(redis, customer, METERS)
        total, fired, last = 0, set[int](), (list[StoredEvent](), -1)
        for kind, n in steps:
            if kind == "add":
                events = calls(customer, n)
                assert await feed.send(events) is Outcome.APPLIED
                [stored] = await feed.sink.stored_offsets([(customer, feed.field)])
                last = (events, stored if stored is not None else -1)
                reached = [q for q in levels if q <= total + n]
                total += n
                best = max(reached, default=None)
                want = [best] if best is not None and best > max(fired, default=0) else []
                fired |= set(want)
            elif kind == "replay":  # the same records again, at the same offset
                assert await feed.send(last[0], offset=last[1]) in (
                    Outcome.OFFSET_MOVED,
                    Outcome.APPLIED,  # nothing sent yet: an empty batch at offset -1
                )
                want = []
            else:  # a client retry: the same events in a new record
                outcome = await feed.send(last[0])
                assert outcome is (Outcome.DUPLICATES if last[0] else Outcome.APPLIED)
                if outcome is Outcome.DUPLICATES:
                    assert await feed.send([]) is Outcome.APPLIED  # what the processor does
                want = []
            got = [parse_crossing(c) for c in await take_out(redis, customer)]
            assert [c.threshold.quantity // VALUE_SCALE for c in got] == want, (kind, total)
            assert all(c.total == total * VALUE_SCALE for c in got)
    finally:
        await redis.aclose()


async def test_a_new_month_fires_afresh(redis: Redis, tenant: str) -> None:
    customer = f"{tenant}-m"
    await set_levels(redis, customer, [5])
    feed = Feed(redis, customer, METERS)
    now = utcnow()
    last_month = datetime(now.year, now.month, 1, tzinfo=UTC) - timedelta(hours=1)
    assert await feed.send(calls(customer, 6, last_month)) is Outcome.APPLIED
    assert await feed.send(calls(customer, 5)) is Outcome.APPLIED
    assert await feed.send(calls(customer, 5)) is Outcome.APPLIED
    months = [parse_crossing(c).month for c in await take_out(redis, customer)]
    assert months == [bucket_id(Window.MONTH, last_month), bucket_id(Window.MONTH, now)]


async def test_no_thresholds_queue_nothing(redis: Redis, tenant: str) -> None:
    customer = f"{tenant}-none"
    feed = Feed(redis, customer, METERS)
    assert await feed.send(calls(customer, 50)) is Outcome.APPLIED
    assert (
        await redis.exists(redis_keys.alerts_out(customer), redis_keys.alerts_fired(customer)) == 0
    )


async def test_published_once_under_a_stable_id_even_after_a_crash(
    redis: Redis, tenant: str
) -> None:
    customer = f"{tenant}-pub"
    thresholds = [
        Threshold(q * VALUE_SCALE, AlertKind.PERCENT, Decimal(p), PLAN_RULE, limit=Decimal(10))
        for q, p in ((8, 80), (9, 90), (10, 100))
    ]
    await redis.hset(redis_keys.alerts(customer), METER, encode(thresholds))
    feed, publisher = Feed(redis, customer, METERS), AlertPublisher(redis, lambda: METERS)
    start: Any = await redis.xrevrange(STREAM, count=1)
    after = start[0][0].decode() if start else "0"
    assert await feed.send(calls(customer, 9)) is Outcome.APPLIED  # 80 and 90 at once
    out = redis_keys.alerts_out(customer)
    [queued] = await redis.lrange(out, 0, -1)
    # A crash after publishing, before trimming: the sweep publishes the same id again.
    assert await publisher.sweep() >= 1
    await redis.rpush(out, queued)
    assert await publisher.drain([customer]) == 1
    assert await redis.llen(out) == 0
    entries: Any = await redis.xrange(STREAM, min=f"({after}")
    published = [orjson.loads(fields[b"n"]) for _, fields in entries]
    mine = [n for n in published if n["customer"] == customer]
    period = datetime(utcnow().year, utcnow().month, 1, tzinfo=UTC)
    want_id = notification_id(
        NotificationType.ALERT_TRIGGERED,
        customer,
        METER,
        f"{period:%Y-%m-%dT%H:%M:%SZ}",
        "plan",
        "percent",
        90,
    )
    assert [n["id"] for n in mine] == [want_id, want_id]
    data = mine[0]["data"]
    assert data["threshold"] == {"kind": "percent", "value": "90", "quantity": "9"}
    assert (data["usage"], data["limit"], data["rule"], data["unit"]) == (
        "9",
        "10",
        "plan",
        "calls",
    )
    assert data["period"]["start"] == f"{period:%Y-%m-%dT%H:%M:%SZ}"


async def test_two_drainers_of_one_list_lose_nothing(redis: Redis, tenant: str) -> None:
    """The start-up sweep and the partition's owner may drain one list at once: every
    crossing is published (some twice, under the same id), none is trimmed unread."""
    customer = f"{tenant}-two"
    out = redis_keys.alerts_out(customer)
    crossings = [
        f"{METER} 2026{m:02d} {q * VALUE_SCALE} {q * VALUE_SCALE} usage,{q},r{q},,"
        for m in range(1, 13)
        for q in range(1, 26)
    ]
    start: Any = await redis.xrevrange(STREAM, count=1)
    after = start[0][0].decode() if start else "0"
    first, second = AlertPublisher(redis, lambda: METERS), AlertPublisher(redis, lambda: METERS)

    async def feed() -> None:
        for chunk in range(0, len(crossings), 30):
            await redis.rpush(out, *crossings[chunk : chunk + 30])
            await asyncio.sleep(0)

    await asyncio.gather(feed(), first.drain([customer]), second.drain([customer]))
    await first.drain([customer])  # what was pushed after both had found the list empty
    assert await redis.llen(out) == 0
    entries: Any = await redis.xrange(STREAM, min=f"({after}")
    published = {orjson.loads(f[b"n"])["id"] for _, f in entries}
    wanted = {notification(customer, parse_crossing(c), "calls").id for c in crossings}
    assert wanted <= published
