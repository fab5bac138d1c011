"""Back-filling a new meter's live counters: events stamped before the meter counted are
added once, whatever the number of runs, and live + back-filled is the exact total."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import timedelta
from decimal import Decimal

import orjson
import psycopg
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.catalog import Aggregation, DimensionFilter, Meter
from schemas.envelope import StoredEvent
from schemas.events import from_micros, utcnow
from schemas.windows import Window, bucket_id
from services.aggregator import increments
from services.aggregator.backfill import backfill_live
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.redis_sink import Apply, Outcome, RedisSink
from services.common import clickhouse
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.conftest import env_for
from tests.support import TALLY, clear_of_midnight

NOW = clear_of_midnight(utcnow(), timedelta(hours=1))  # events up to 50 min before
METER = Meter(
    name="bf_input_tokens",
    event_type="bf_llm_call",
    aggregation=Aggregation.SUM,
    value_property="$.tokens.input",
    group_by=("$.model",),
    filters={"$.region": DimensionFilter(equals="eu")},
)
COUNTING_FROM = 5


def _call(customer: str, n: int, tokens: int, stamp: int, region: str = "eu") -> StoredEvent:
    model = "gpt-4o" if n % 2 else "mini"
    data = {"model": model, "region": region, "tokens": {"input": tokens}}
    return StoredEvent(
        f"{customer}-{n}",
        "gw",
        METER.event_type,
        customer,
        NOW - timedelta(minutes=n),
        Decimal(1),
        {"model": model, "region": region},
        NOW,
        data=orjson.dumps(data).decode(),
        catalog_version=stamp,
    )


async def _day(redis: Redis, customer: str) -> dict[str, Decimal]:
    key = redis_keys.counters(customer, METER.name, Window.DAY, bucket_id(Window.DAY, NOW))
    found = await redis.hgetall(key)
    return {_text(k): from_micros(int(v)) for k, v in found.items()}


def _text(field: bytes | str) -> str:
    return field.decode() if isinstance(field, bytes) else field


async def test_backfill_adds_the_events_before_the_meter_once(
    ch: ClickHouse, redis: Redis, tenant: str
) -> None:
    customers = [f"{tenant}-a", f"{tenant}-b"]
    events = {
        c: [_call(c, n, 10 * n + 1, stamp=3 if n < 6 else COUNTING_FROM) for n in range(10)]
        + [_call(c, 50, 1000, stamp=2, region="us")]  # filtered out either way
        for c in customers
    }
    sink = RedisSink(redis)
    for customer, evs in events.items():
        await ClickHouseSink(ch).write(evs)
        live = increments.build(
            customer, evs, {METER.event_type: [METER]}, NOW, {METER.name: COUNTING_FROM}
        )
        [reply] = await sink.apply([Apply(customer, "t/0", None, 1, [], 0, [], live)])
        assert reply.outcome is Outcome.APPLIED
    before = await _day(redis, customers[0])
    assert before[redis_keys.TOTAL] == sum(10 * n + 1 for n in range(6, 10))

    first = await backfill_live(ch, sink, METER, COUNTING_FROM, NOW)
    assert (first.customers, first.events, first.already) == (2, 14, 0)  # "us" ones read too
    for customer in customers:
        day = await _day(redis, customer)
        assert day[redis_keys.TOTAL] == sum(10 * n + 1 for n in range(10))
        assert day[redis_keys.group_field(("gpt-4o",))] == sum(
            10 * n + 1 for n in range(10) if n % 2
        )

    again = await backfill_live(ch, sink, METER, COUNTING_FROM, NOW)
    assert (again.customers, again.events, again.already) == (0, 0, 2)
    assert (await _day(redis, customers[0]))[redis_keys.TOTAL] == sum(10 * n + 1 for n in range(10))


def test_the_backfill_command(settings: Settings, tenant: str) -> None:
    """``tally meters backfill`` rolls the meter's days up and reports its live back-fill;
    an unknown meter is refused by name."""
    customer = f"{tenant}-cli"
    client = clickhouse.connect(settings)
    clickhouse.create_schema(client)
    call = StoredEvent(
        "cli-1", "gw", "api_call", customer, NOW, Decimal(1), {"endpoint": "/z"}, NOW
    )
    asyncio.run(ClickHouseSink(client).write([call]))
    client.close()  # chDB: one process at a time
    env = os.environ | env_for(settings) | {"TALLY_ROLLUP_SAFETY_LAG_SECONDS": "0"}
    done = subprocess.run(
        [*TALLY, "meters", "backfill", "api_calls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "rolled up" in done.stdout and "live counters: 0 events" in done.stdout, done.stdout
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT value FROM usage_daily WHERE customer = %s AND meter = 'api_calls'"
            " AND group_key = '*'",
            (customer,),
        ).fetchone()
    assert row is not None and row[0] == 1
    unknown = subprocess.run(
        [*TALLY, "meters", "backfill", "no_such_meter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "no meter 'no_such_meter'" in unknown.stderr
