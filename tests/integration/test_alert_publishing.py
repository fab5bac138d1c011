"""Alert crossings leave the aggregator beside its batches, not inside them.

A batch that crosses a threshold queues the crossing (atomically, in its Lua call),
names the customer to the publisher and returns without publishing; the publisher's
own task (``AlertPublisher.run``) puts it on the stream as soon as it runs, with no
timer and no later batch needed.  A drain that fails keeps its customers named, so the
next pass publishes them; ``flush`` (at stop) publishes what is named.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from schemas import envelope, redis_keys
from schemas.alerts import AlertKind, Threshold, encode
from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, utcnow
from schemas.notifications import STREAM
from services.aggregator.alerts import AlertPublisher
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.processor import BatchProcessor, Record
from services.aggregator.redis_sink import RedisSink
from services.common.clickhouse import ClickHouse
from tests.webhook_support import eventually

METER = "api_calls"
_ids = itertools.count()


async def quota_of_ten(redis: Redis, customer: str) -> None:
    """Alerts at 8, 9 and 10 calls (80, 90, 100 % of 10)."""
    thresholds = [
        Threshold(q * VALUE_SCALE, AlertKind.PERCENT, Decimal(p), "plan", limit=Decimal(10))
        for q, p in ((8, 80), (9, 90), (10, 100))
    ]
    await redis.hset(redis_keys.alerts(customer), METER, encode(thresholds))


def calls(customer: str, offset: int, n: int) -> Record:
    now = utcnow()
    events = [
        StoredEvent(f"p{next(_ids)}", "src", "api_call", customer, now, Decimal(1), {}, now)
        for _ in range(n)
    ]
    return Record("tally.events", 0, offset, envelope.encode(customer, events, now))


async def published_for(redis: Redis, customer: str, after: str) -> list[dict[str, Any]]:
    entries: Any = await redis.xrange(STREAM, min=f"({after}")
    found = [orjson.loads(fields[b"n"]) for _, fields in entries]
    return [n for n in found if n["customer"] == customer]


async def stream_end(redis: Redis) -> str:
    last: Any = await redis.xrevrange(STREAM, count=1)
    return last[0][0].decode() if last else "0"


async def test_the_batch_names_the_customer_and_the_publisher_sends_at_once(
    ch: ClickHouse, redis: Redis, meters: dict[str, list[Meter]], tenant: str
) -> None:
    customer = f"{tenant}-beside"
    await quota_of_ten(redis, customer)
    publisher = AlertPublisher(redis, lambda: meters)
    named: list[set[str]] = []

    def alerting(customers: set[str]) -> None:
        named.append(set(customers))
        publisher.wake(customers)

    async def dead_letter(record: Record, reason: str) -> None:
        raise AssertionError(reason)

    processor = BatchProcessor(
        ClickHouseSink(ch),
        RedisSink(redis),
        lambda: meters,
        DedupeWindow(timedelta(hours=24)),
        dead_letter,
        incarnation=f"{tenant}-publishing",
        alerting=alerting,
    )
    after = await stream_end(redis)
    await processor.process([calls(customer, 0, 7)])
    assert named == []  # below every threshold: nobody to name
    await processor.process([calls(customer, 1, 2)])  # 80 and 90 at once: 90 fires
    assert named == [{customer}]
    # The batch returned without publishing: the crossing waits in the out list.
    out = redis_keys.alerts_out(customer)
    assert await redis.llen(out) == 1
    assert await published_for(redis, customer, after) == []

    running = asyncio.create_task(publisher.run())
    try:
        mine = await eventually(lambda: published_for(redis, customer, after), within=5)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert [n["data"]["threshold"]["value"] for n in mine] == ["90"]
    assert await redis.llen(out) == 0


async def test_a_failed_drain_keeps_its_customers_for_the_next_pass(
    redis: Redis, meters: dict[str, list[Meter]], tenant: str
) -> None:
    broken, fine = f"{tenant}-a-broken", f"{tenant}-b-fine"
    publisher = AlertPublisher(redis, lambda: meters)
    await redis.rpush(redis_keys.alerts_out(broken), "not a crossing")
    crossing = f"{METER} {utcnow():%Y%m} {8 * VALUE_SCALE} {8 * VALUE_SCALE} percent,80,plan,10,"
    await redis.rpush(redis_keys.alerts_out(fine), crossing)
    after = await stream_end(redis)
    publisher.wake([broken, fine])
    with pytest.raises(ValueError):  # a crossing that cannot be read fails the drain
        await publisher.flush()
    assert await published_for(redis, fine, after) == []
    assert await redis.llen(redis_keys.alerts_out(fine)) == 1  # nothing trimmed

    await redis.delete(redis_keys.alerts_out(broken))
    assert await publisher.flush() == 1  # still named: published without a new wake
    [alert] = await published_for(redis, fine, after)
    assert alert["data"]["threshold"]["value"] == "80"
    assert await redis.llen(redis_keys.alerts_out(fine)) == 0
    assert await publisher.flush() == 0  # and named no more
