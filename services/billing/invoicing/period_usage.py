"""A billing period's usage per customer and meter, read from the rollups.

Sums and counts add their days up, maxima and minima take the largest and smallest day,
``latest`` takes the value seen last; all come from one PostgreSQL query over
``usage_daily`` for a whole batch of customers — over ``usage_hourly`` for the ranges
that do not start and end at UTC midnight (a customer billed in another time zone).
Distinct counts and averages cannot be made of days, so those meters are asked of the raw
events in ClickHouse (the rollups' SQL, ``meter_sql``), once per distinct range in the
batch.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, time
from decimal import Decimal

from psycopg import AsyncConnection

from schemas.catalog import Aggregation, Meter
from services.billing.rollup.meter_sql import meter_sql
from services.common.clickhouse import ClickHouse

Wanted = tuple[str, datetime, datetime, Sequence[str]]  # customer, start, stop, meters
Quantities = dict[tuple[int, str], Decimal]  # (index in the request, meter) -> quantity

_ROLLED = """
    SELECT s.idx, u.meter, sum(u.value), max(u.value),
           (array_agg(u.value ORDER BY u.latest_at DESC NULLS LAST, u.{column} DESC))[1],
           min(u.value)
    FROM unnest(%s::int[], %s::text[], %s::{kind}[], %s::{kind}[])
        AS s(idx, customer, first, stop)
    JOIN {table} u ON u.customer = s.customer AND u.{column} >= s.first AND u.{column} < s.stop
    WHERE u.group_key = '*' AND u.meter = ANY(%s)
    GROUP BY s.idx, u.meter
"""
_DAILY = _ROLLED.format(column="day", kind="date", table="usage_daily")
_HOURLY = _ROLLED.format(column="hour", kind="timestamptz", table="usage_hourly")
_COLUMN = {
    Aggregation.COUNT: 2,
    Aggregation.SUM: 2,
    Aggregation.MAX: 3,
    Aggregation.LATEST: 4,
    Aggregation.MIN: 5,
}
_FROM_EVENTS = (Aggregation.UNIQUE_COUNT, Aggregation.AVG)


async def quantities(
    conn: AsyncConnection,
    clickhouse: Callable[[], ClickHouse],
    meters: Mapping[str, Meter],
    wanted: Sequence[Wanted],
) -> Quantities:
    """Each wanted (customer, days, meters)'s usage; meters without usage are absent."""
    found = await _from_rollups(conn, meters, wanted)
    for meter in (m for m in meters.values() if m.aggregation in _FROM_EVENTS):
        asked = [(i, w) for i, w in enumerate(wanted) if meter.name in w[3]]
        if asked:
            found |= await asyncio.to_thread(_from_events, clickhouse(), meter, asked)
    return found


async def _from_rollups(
    conn: AsyncConnection, meters: Mapping[str, Meter], wanted: Sequence[Wanted]
) -> Quantities:
    rolled = [m.name for m in meters.values() if m.aggregation in _COLUMN]
    if not wanted or not rolled:
        return {}
    days = [(i, c, f.date(), s.date()) for i, (c, f, s, _) in enumerate(wanted) if _days(f, s)]
    hours = [(i, c, f, s) for i, (c, f, s, _) in enumerate(wanted) if not _days(f, s)]
    found: Quantities = {}
    for sql, asked in ((_DAILY, days), (_HOURLY, hours)):
        if not asked:
            continue
        columns = list(zip(*asked, strict=True))
        cur = await conn.execute(sql, [*map(list, columns), rolled])
        for row in await cur.fetchall():
            index, meter = row[0], row[1]
            if meter in wanted[index][3]:
                found[index, meter] = row[_COLUMN[meters[meter].aggregation]]
    return found


def _days(start: datetime, stop: datetime) -> bool:
    """Does [start, stop) begin and end at UTC midnight (whole rows of usage_daily)?"""
    return all(m.astimezone(UTC).time() == time() for m in (start, stop))


def _from_events(
    clickhouse: ClickHouse, meter: Meter, asked: Sequence[tuple[int, Wanted]]
) -> Quantities:
    by_days: dict[tuple[datetime, datetime], dict[str, list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for index, (customer, first, stop, _) in asked:
        by_days[first, stop][customer].append(index)
    found: Quantities = {}
    built = meter_sql(meter)
    for (first, stop), customers in by_days.items():
        rows = clickhouse.query(
            f"SELECT customer, toString({built.value})"
            f" FROM {clickhouse.database}.events FINAL"
            f" WHERE {built.counted} AND customer IN {{customers:Array(String)}}"
            " AND time >= {start:DateTime64(6, 'UTC')} AND time < {stop:DateTime64(6, 'UTC')}"
            " GROUP BY customer",
            {
                **built.params,
                "customers": list(customers),
                "start": first.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                "stop": stop.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        for customer, value in rows:
            for index in customers[customer]:
                found[index, meter.name] = Decimal(value)
    return found
