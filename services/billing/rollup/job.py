"""Rolling raw events up from ClickHouse into ``usage_hourly``, ``usage_daily`` and
``usage_monthly``.

A rollup recomputes whole (customer, day) and (customer, month) cells — a day's cell
holds its UTC hours too, which usage read in another time zone composes into local
days — from the deduplicated raw events (``FINAL``) and replaces them in one transaction,
so it is
idempotent and can be rerun for any range.  Each row records the ``stored_at``
watermark it covers: events stored up to then are in it.  The incremental pass asks
ClickHouse which cells gained events since the last watermark — that is how an event
arriving days late corrects the day it belongs to.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
from psycopg_pool import AsyncConnectionPool

from schemas import redis_keys
from schemas.catalog import Meter
from services.billing.rollup import watermark as watermarks
from services.billing.rollup.meter_sql import meter_sql
from services.common import catalog, metrics
from services.common.clickhouse import ClickHouse

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_DAY = timedelta(days=1)
_TS = "DateTime64(6, 'UTC')"


@dataclass(frozen=True, slots=True)
class Grain:
    """A rollup granularity: the ClickHouse bucket expression and the target table."""

    name: str
    bucket_sql: str
    table: str
    column: str


HOUR = Grain("hour", "toStartOfHour(time)", "usage_hourly", "hour")
DAY = Grain("day", "toDate(time)", "usage_daily", "day")
MONTH = Grain("month", "toStartOfMonth(time)", "usage_monthly", "month")


@dataclass(frozen=True, slots=True)
class Row:
    customer: str
    meter: str
    bucket: date  # an hour's row: its start, a datetime
    group_key: str
    groups: dict[str, str]
    value: Decimal
    latest_at: datetime | None


@dataclass(frozen=True, slots=True)
class Report:
    watermark: datetime
    cells: int
    rows: int


class Rollup:
    def __init__(
        self, clickhouse: ClickHouse, pool: AsyncConnectionPool, safety_lag: timedelta
    ) -> None:
        self._ch = clickhouse
        self._pool = pool
        self._safety_lag = safety_lag
        self._events = f"{clickhouse.database}.events"

    async def run_range(self, first: date, last: date) -> Report:
        """Recompute every customer's days in [first, last] and the months they touch."""
        watermark = await self._watermark()
        start = datetime.combine(first, time(), UTC)
        end = datetime.combine(last + timedelta(days=1), time(), UTC)
        customers = await self._query_customers(start, end, watermark)
        cells = {(c, d) for c, days in customers.items() for d in days}
        return await self._recompute(cells, watermark)

    async def run_incremental(self) -> Report:
        """Recompute the cells that gained events since the last watermark."""
        previous = await watermarks.read(self._pool) or EPOCH
        watermark = await self._watermark()
        rows = await self._ch_query(
            f"SELECT DISTINCT customer, toString(toDate(time)) FROM {self._events}"
            f" WHERE stored_at > {{since:{_TS}}} AND stored_at <= {{until:{_TS}}}",
            since=previous,
            until=watermark,
        )
        cells = {(customer, date.fromisoformat(day)) for customer, day in rows}
        report = await self._recompute(cells, watermark)
        await watermarks.write(self._pool, watermark)
        return report

    async def _query_customers(
        self, start: datetime, end: datetime, watermark: datetime
    ) -> dict[str, set[date]]:
        rows = await self._ch_query(
            f"SELECT DISTINCT customer, toString(toDate(time)) FROM {self._events}"
            f" WHERE time >= {{start:{_TS}}} AND time < {{end:{_TS}}}"
            f" AND stored_at <= {{until:{_TS}}}",
            start=start,
            end=end,
            until=watermark,
        )
        found: dict[str, set[date]] = defaultdict(set)
        for customer, day in rows:
            found[customer].add(date.fromisoformat(day))
        return found

    async def _recompute(self, cells: set[tuple[str, date]], watermark: datetime) -> Report:
        if not cells:
            return Report(watermark, 0, 0)
        with metrics.ROLLUP_SECONDS.time():
            meters = await catalog.read_meters(self._pool)
            days = sorted({d for _, d in cells})
            months = sorted({d.replace(day=1) for d in days})
            customers = sorted({c for c, _ in cells})
            hourly = await self._aggregate(HOUR, meters, customers, days, watermark)
            daily = await self._aggregate(DAY, meters, customers, days, watermark)
            monthly = await self._aggregate(MONTH, meters, customers, months, watermark)
            month_cells = {(c, d.replace(day=1)) for c, d in cells}
            hourly = [r for r in hourly if (r.customer, _day_of(r.bucket)) in cells]
            daily = [r for r in daily if (r.customer, r.bucket) in cells]
            monthly = [r for r in monthly if (r.customer, r.bucket) in month_cells]
            await self._replace(HOUR, cells, hourly, watermark)
            await self._replace(DAY, cells, daily, watermark)
            await self._replace(MONTH, month_cells, monthly, watermark)
        metrics.ROLLUP_ROWS.inc(len(hourly) + len(daily) + len(monthly))
        return Report(watermark, len(cells), len(daily) + len(monthly))

    async def _aggregate(
        self,
        grain: Grain,
        meters: Sequence[Meter],
        customers: Sequence[str],
        buckets: Sequence[date],
        watermark: datetime,
    ) -> list[Row]:
        start = datetime.combine(buckets[0], time(), UTC)
        end = datetime.combine(_bucket_end(grain, buckets[-1]), time(), UTC)
        rows: list[Row] = []
        for meter in meters:
            for grouped in {False, bool(meter.group_by)}:
                rows += await self._aggregate_meter(
                    grain, meter, grouped, customers, start, end, watermark
                )
        return rows

    async def _aggregate_meter(
        self,
        grain: Grain,
        meter: Meter,
        grouped: bool,
        customers: Sequence[str],
        start: datetime,
        end: datetime,
        watermark: datetime,
    ) -> list[Row]:
        built = meter_sql(meter)
        groups = built.groups if grouped else []
        group_sql = "".join(f", g{i}" for i in range(len(groups)))
        select_groups = "".join(f", {g} AS g{i}" for i, g in enumerate(groups))
        sql = (
            f"SELECT customer, toString({grain.bucket_sql}) AS bucket,"
            f" toString({built.value}), toString(max(time)){select_groups}"
            f" FROM {self._events} FINAL"
            f" WHERE {built.counted} AND customer IN {{customers:Array(String)}}"
            f" AND time >= {{start:{_TS}}} AND time < {{end:{_TS}}}"
            f" AND stored_at <= {{until:{_TS}}}"
            f" GROUP BY customer, bucket{group_sql}"
        )
        result = await self._ch_query(
            sql,
            customers=list(customers),
            start=start,
            end=end,
            until=watermark,
            **built.params,
        )
        return [_row(grain, meter, grouped, raw) for raw in result]

    async def _replace(
        self, grain: Grain, cells: set[tuple[str, date]], rows: Iterable[Row], watermark: datetime
    ) -> None:
        by_customer: dict[str, list[date]] = defaultdict(list)
        for customer, bucket in cells:
            by_customer[customer].append(bucket)
        if grain is HOUR:  # a day's hours
            delete = f"DELETE FROM {grain.table} WHERE customer = %s AND hour >= %s AND hour < %s"
            doomed: list[tuple[Any, ...]] = [
                (c, _midnight(d), _midnight(d) + ONE_DAY) for c, d in cells
            ]
        else:
            delete = f"DELETE FROM {grain.table} WHERE customer = %s AND {grain.column} = ANY(%s)"
            doomed = list(by_customer.items())
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(delete, doomed)
            await cur.executemany(
                f"INSERT INTO {grain.table} (customer, meter, {grain.column}, group_key,"
                " groups, value, latest_at, watermark) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        r.customer,
                        r.meter,
                        r.bucket,
                        r.group_key,
                        orjson.dumps(r.groups).decode(),
                        r.value,
                        r.latest_at,
                        watermark,
                    )
                    for r in rows
                ],
            )

    async def _ch_query(self, sql: str, **params: Any) -> list[list[Any]]:
        bound = {k: _param(v) for k, v in params.items()}
        return await asyncio.to_thread(self._ch.query, sql, bound)

    async def _watermark(self) -> datetime:
        """Now on ClickHouse's own clock — it stamps ``stored_at`` — less the safety lag
        that lets inserts in flight become visible before a pass moves past them."""
        [[now]] = await self._ch_query("SELECT toString(now64(6, 'UTC'))")
        return datetime.fromisoformat(now).replace(tzinfo=UTC) - self._safety_lag


def _row(grain: Grain, meter: Meter, grouped: bool, raw: list[Any]) -> Row:
    customer, bucket, value, latest, *groups = raw
    names = meter.group_names if grouped else ()
    return Row(
        customer=customer,
        meter=meter.name,
        bucket=_hour(bucket) if grain is HOUR else date.fromisoformat(bucket),
        group_key=redis_keys.group_field(tuple(groups)),
        groups=dict(zip(names, groups, strict=True)),
        value=Decimal(value),
        latest_at=datetime.fromisoformat(latest).replace(tzinfo=UTC),
    )


def _hour(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _day_of(bucket: date) -> date:
    return bucket.date() if isinstance(bucket, datetime) else bucket


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def _bucket_end(grain: Grain, bucket: date) -> date:
    """The end of the last bucket asked for (an hourly rollup is asked for whole days)."""
    if grain is not MONTH:
        return bucket + ONE_DAY
    return (bucket.replace(day=28) + timedelta(days=4)).replace(day=1)


def _param(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value
