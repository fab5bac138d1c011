"""This month's usage of every meter, per customer, exact and current to the second.

The aggregator keeps each customer's month total of each meter in Redis (the ``*``
field of the month's counters, in micro-units: ``schemas.redis_keys``), the figure
enforcement counts quotas on for customers billed in UTC.  A month Redis does not hold
(flushed, or never reached there) is read from the ``usage_monthly`` rollup.  A meter's
total across customers adds the customers' month values up: calls and sums as they are,
for a ``max`` meter the sum
of each customer's peak, for a ``unique_count`` meter the sum of each customer's
distinct count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from psycopg import AsyncConnection
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.catalog import Meter
from schemas.events import from_micros
from schemas.revenue import TOP, CustomerQuantity, MeterUsage, UsageThisMonth
from schemas.windows import Window, bucket_id, bucket_start
from services.common.redis import UNREACHABLE

Found = dict[tuple[str, str], Decimal]  # (customer, meter) -> this month's value


async def this_month(
    conn: AsyncConnection, redis: Redis, meters: Sequence[Meter], now: datetime
) -> UsageThisMonth:
    cur = await conn.execute("SELECT id FROM customers ORDER BY id")
    customers = [row[0] for row in await cur.fetchall()]
    names = [m.name for m in meters]
    found = await _from_redis(redis, customers, names, now)
    missing = [(c, m) for c in customers for m in names if (c, m) not in found]
    found |= await _from_rollups(conn, missing, now)
    month = bucket_start(Window.MONTH, now)
    return UsageThisMonth(month=month.strftime("%Y-%m"), meters=[_meter(m, found) for m in meters])


async def _from_redis(
    redis: Redis, customers: Sequence[str], meters: Sequence[str], now: datetime
) -> Found:
    bucket = bucket_id(Window.MONTH, now)
    asked = [(c, m) for c in customers for m in meters]
    found: Found = {}
    with contextlib.suppress(*UNREACHABLE):
        async with redis.pipeline(transaction=False) as pipe:
            for customer, meter in asked:
                pipe.hget(redis_keys.counters(customer, meter, Window.MONTH, bucket), "*")
            replies = await pipe.execute()
        for key, raw in zip(asked, replies, strict=True):
            if raw is not None:
                found[key] = from_micros(int(raw))
    return found


async def _from_rollups(
    conn: AsyncConnection, missing: Sequence[tuple[str, str]], now: datetime
) -> Found:
    """The rollup rows of the pairs Redis did not answer, by their primary key (the
    table has no index by month alone)."""
    if not missing:
        return {}
    customers, meters = zip(*missing, strict=True)
    cur = await conn.execute(
        "SELECT u.customer, u.meter, u.value FROM unnest(%s::text[], %s::text[]) AS w(c, m)"
        " JOIN usage_monthly u ON u.customer = w.c AND u.meter = w.m"
        " WHERE u.month = %s AND u.group_key = '*'",
        (list(customers), list(meters), bucket_start(Window.MONTH, now).date()),
    )
    return {(c, m): v.normalize() + Decimal(0) for c, m, v in await cur.fetchall()}


def _meter(meter: Meter, found: Found) -> MeterUsage:
    values = sorted(
        ((c, v) for (c, m), v in found.items() if m == meter.name and v),
        key=lambda item: (-item[1], item[0]),
    )
    return MeterUsage(
        meter=meter.name,
        unit=meter.unit,
        aggregation=meter.aggregation.value,
        total=sum((v for _, v in values), Decimal(0)),
        customers=len(values),
        top=[CustomerQuantity(customer=c, quantity=v) for c, v in values[:TOP]],
    )
