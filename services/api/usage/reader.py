"""Usage over time for one customer and meter, never computed from raw events.

Buckets still inside their Redis retention are read from the aggregator's live
counters, which are exact and current to the second.  Older day and month buckets —
and live ones Redis has lost, after a flush — come from the ``usage_daily`` /
``usage_monthly`` rollups.  Minute and hour buckets only exist in Redis.
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import lua, redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.events import VALUE_SCALE, from_micros, micros_text, to_micros
from schemas.windows import RETENTION, Window, buckets, next_bucket, start_id
from schemas.zones import HOUR
from services.api.usage import zones
from services.common import postgres

MAX_BUCKETS = 2000
READ_BUCKETS = lua.source("read_buckets")
RANK_BUCKETS = lua.source("rank_buckets")
_FOLDS = {Aggregation.MAX: "max", Aggregation.MIN: "min", Aggregation.LATEST: "latest"}
"""How ``rank_buckets.lua`` folds a group's buckets, as ``ranking.totals`` does (the
others add up)."""
_TIME_SUFFIX = redis_keys.TIME_SUFFIX.encode()
_COUNT_SUFFIX = redis_keys.COUNT_SUFFIX


class Point(NamedTuple):
    """One bucket's value (of one group, grouped).  A named tuple: a read makes one per
    bucket and group, and a frozen dataclass costs twice as much to build."""

    start: datetime
    end: datetime
    value: Decimal
    groups: dict[str, str] | None


@functools.lru_cache(maxsize=8192)
def _stamp(moment: datetime, zone: tzinfo | None, fold: int) -> str:
    """RFC 3339 of a bucket boundary, remembered: a bucket's end is the next one's start
    and reads ask for the same buckets again.  Keyed by zone and fold too: one instant in
    New York and in UTC is one equal ``datetime``, and so are the two 01:00s of New
    York's fall-back night."""
    return moment.isoformat()


def stamp(moment: datetime) -> str:
    """RFC 3339 of a bucket boundary as the usage API shows it (remembered)."""
    return _stamp(moment, moment.tzinfo, moment.fold)


class _Names(dict[str, dict[str, str]]):
    """Each group's field as its dimensions and values, parsed once per read, not once
    per bucket."""

    def __init__(self, meter: Meter) -> None:
        super().__init__()
        self._meter = meter

    def __missing__(self, field: str) -> dict[str, str]:
        named = self[field] = group_names(self._meter, field)
        return named


@dataclass(frozen=True, slots=True)
class Cells:
    """What the reader found: each bucket's values by group field (``*``: the total), in
    micro-units (``schemas.events.VALUE_SCALE``) as Redis counts them: exact integers
    until a point is shown, and only the points shown become text or ``Decimal``s."""

    starts: list[datetime]
    ends: list[datetime]
    found: dict[datetime, dict[str, int]]
    shown: ZoneInfo | None = None
    """The zone the points' bounds are shown in, the buckets read as they are: UTC hours
    are found by their UTC starts (the repeated hour of a fall-back, shown in the zone,
    equals neither of its UTC hours)."""

    def shown_in(self, tz: ZoneInfo) -> Cells:
        """The same buckets, their points' bounds in ``tz``'s offsets."""
        return replace(self, shown=tz)

    def points(self, meter: Meter, grouped: bool, fields: Sequence[str] = ()) -> list[Point]:
        """One point per bucket; grouped, one per bucket and group — of ``fields`` only,
        in that order, when given (else every group, in field order)."""
        named = _Names(meter)
        return [
            Point(start, end, from_micros(micros), named[field] if grouped else None)
            for start, end, values in self._buckets(grouped, fields)
            for field, micros in values
        ]

    def rows(self, meter: Meter, grouped: bool, fields: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The points as the usage API shows them (``UsageSeries.data``), made at once:
        a top 5 of a month is 155 of them, and a ``Point`` and then a dict for each cost
        as much as the rest of the read."""
        named = _Names(meter)
        rows = []
        for start, end, values in self._buckets(grouped, fields):
            since, until = stamp(start), stamp(end)
            for field, micros in values:
                row: dict[str, Any] = {"start": since, "end": until, "value": micros_text(micros)}
                if grouped:
                    row["groups"] = named[field]
                rows.append(row)
        return rows

    def _buckets(
        self, grouped: bool, fields: Sequence[str]
    ) -> Iterator[tuple[datetime, datetime, list[tuple[str, int]]]]:
        """Each bucket's bounds (shown in ``shown``) and the values its points show: the
        total (0 when the bucket is empty), or each group's that has one."""
        for bucket, end in zip(self.starts, self.ends, strict=True):
            cells = self.found.get(bucket, {})
            if self.shown is not None:  # after the lookup: keys are the buckets as read
                bucket, end = bucket.astimezone(self.shown), end.astimezone(self.shown)
            if not grouped:
                yield bucket, end, [(redis_keys.TOTAL, cells.get(redis_keys.TOTAL, 0))]
                continue
            shown = fields or sorted(cells)
            yield (
                bucket,
                end,
                [(f, cells[f]) for f in shown if f != redis_keys.TOTAL and f in cells],
            )


def group_names(meter: Meter, field: str) -> dict[str, str]:
    """A group's hash field as the meter's dimensions (named by path) and their values."""
    return dict(zip(meter.group_names, redis_keys.parse_group(field), strict=True))


def _hour_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _averages(micros: dict[str, int]) -> dict[str, int]:
    """An avg meter's sums divided by their counts, truncated to 6 places as ClickHouse's
    decimal division does (the rollups agree to the last digit)."""
    found = {}
    for field, total in micros.items():
        count = micros.get(redis_keys.count_field(field))
        if field.endswith(_COUNT_SUFFIX) or not count:
            continue
        found[field] = total * VALUE_SCALE // count
    return found


class UsageReader:
    def __init__(self, redis: Redis, pool: AsyncConnectionPool) -> None:
        self._redis = redis
        self._pool = pool
        self._read = redis.register_script(READ_BUCKETS)
        self._rank = redis.register_script(RANK_BUCKETS)

    async def read(
        self,
        customer: str,
        meter: Meter,
        window: Window,
        start: datetime,
        end: datetime,
        grouped: bool,
        now: datetime,
        top: int | None = None,
    ) -> Cells:
        """With ``top``, grouped: the groups narrowed in Redis to those that may be among
        the ``top`` largest over the range (``ranking.top`` then picks exactly), without
        the buckets' totals — when Redis holds every bucket.  When some come from the
        rollups, Redis's top need not be the range's: every group is read then."""
        starts = list(buckets(window, start, end))
        if not starts:
            return Cells([], [], {})
        ends = [*starts[1:], next_bucket(window, starts[-1])]  # buckets are contiguous
        kept = RETENTION[window]  # a bucket is live until its end + the retention
        live = [s for s, e in zip(starts, ends, strict=True) if e + kept > now]
        ranked = (
            top is not None
            and grouped
            and meter.aggregation is not Aggregation.AVG  # sums and counts, not averages
            and len(live) == len(starts)  # else older buckets come from the rollups
        )
        if ranked and top is not None:
            found = await self._ranked(customer, meter, window, live, top)
        else:
            found = await self._from_redis(customer, meter, window, live, grouped)
        if window in (Window.DAY, Window.MONTH):
            missing = [s for s in starts if s not in found]
            rolled = await self._from_rollups(customer, meter, window, missing, grouped)
            if rolled and ranked:  # narrowed on Redis's buckets alone
                found = await self._from_redis(customer, meter, window, live, grouped)
            found |= rolled
        return Cells(starts, ends, found)

    async def read_zoned(
        self,
        customer: str,
        meter: Meter,
        window: Window,
        start: datetime,
        end: datetime,
        grouped: bool,
        now: datetime,
        tz: ZoneInfo,
    ) -> Cells:
        """Local days or months of ``tz`` (``zones``), composed of UTC hours: live ones
        from Redis, older ones — and any Redis has lost — from ``usage_hourly``."""
        bounds = zones.local_buckets(window, start, end, tz)
        first, stop = bounds[0].astimezone(UTC), bounds[-1].astimezone(UTC)
        cutoff = max(first, _hour_floor(now - RETENTION[Window.HOUR]) + HOUR)
        live = list(zones.hours(cutoff, stop))
        held = await self._from_redis(customer, meter, Window.HOUR, live, grouped)
        missing = [hour for hour in live if hour not in held]
        parts: dict[datetime, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        edges = [b.astimezone(UTC) for b in bounds]
        for hour, cells in held.items():
            bucket = bounds[bisect_right(edges, hour) - 1]
            for field, value in cells.items():
                parts[bucket][field].append(value)
        span = (first, min(cutoff, stop))
        rolled = await self._hourly(customer, meter, window, tz, span, missing, grouped)
        for (bucket, field), value in rolled.items():
            parts[bucket][field].append(value)
        found = {
            bucket: {
                field: zones.fold(meter.aggregation, values) for field, values in cells.items()
            }
            for bucket, cells in parts.items()
        }
        return Cells(bounds[:-1], bounds[1:], found)

    async def _hourly(
        self,
        customer: str,
        meter: Meter,
        window: Window,
        tz: ZoneInfo,
        span: tuple[datetime, datetime],
        missing: Sequence[datetime],
        grouped: bool,
    ) -> dict[tuple[datetime, str], int]:
        """Rolled-up hours of [span) and the ``missing`` ones, folded per local bucket
        by PostgreSQL, which knows every zone's rules."""
        fold = {Aggregation.MAX: "max", Aggregation.MIN: "min"}.get(meter.aggregation, "sum")
        unit = "month" if window is Window.MONTH else "day"
        async with postgres.reading(self._pool) as conn:
            cur = await conn.execute(
                f"SELECT date_trunc(%s, hour AT TIME ZONE %s), group_key, {fold}(value)"
                " FROM usage_hourly WHERE customer = %s AND meter = %s"
                " AND ((hour >= %s AND hour < %s) OR hour = ANY(%s))"
                f" AND group_key {'<>' if grouped else '='} '*' GROUP BY 1, 2",
                (unit, tz.key, customer, meter.name, *span, list(missing)),
            )
            rows = await cur.fetchall()
        return {(local.replace(tzinfo=tz), key): to_micros(value) for local, key, value in rows}

    async def _from_redis(
        self, customer: str, meter: Meter, window: Window, starts: Sequence[datetime], grouped: bool
    ) -> dict[datetime, dict[str, int]]:
        """Buckets Redis holds; a bucket without a key is left out, not reported as 0.
        Ungrouped, only each bucket's total is fetched: its groups would be read, parsed
        and thrown away (a month of 20 endpoints is 651 values for 31 totals)."""
        if not starts:
            return {}
        prefix = redis_keys.counters_prefix(customer, meter.name, window)
        keys = [prefix + start_id(window, s) for s in starts]
        averages = meter.aggregation is Aggregation.AVG  # needs each sum's count too
        every_field = grouped or averages
        replies = await self._read(keys=keys, args=["" if every_field else redis_keys.TOTAL])
        found: dict[datetime, dict[str, int]] = {}
        for bucket, raw in zip(starts, replies, strict=True):
            if not raw:
                continue
            if not every_field:
                found[bucket] = {redis_keys.TOTAL: int(raw)}
                continue
            cells = iter(raw)
            pairs = zip(cells, cells, strict=True)
            if averages:
                micros = {f.decode(): int(v) for f, v in pairs if not f.endswith(_TIME_SUFFIX)}
                found[bucket] = _averages(micros)
            else:  # one pass: a grouped month is hundreds of fields
                found[bucket] = {
                    f.decode(): int(v) for f, v in pairs if not f.endswith(_TIME_SUFFIX)
                }
            if not grouped:
                found[bucket] = {k: v for k, v in found[bucket].items() if k == redis_keys.TOTAL}
        return found

    async def _ranked(
        self, customer: str, meter: Meter, window: Window, starts: Sequence[datetime], top: int
    ) -> dict[datetime, dict[str, int]]:
        """Buckets Redis holds, with only the groups that may rank among the ``top``
        (``rank_buckets.lua``): a top 5 of 20 endpoints parses 5 groups per bucket, not
        21.  A bucket without a key is left out, as ``_from_redis`` leaves it."""
        if not starts:
            return {}
        prefix = redis_keys.counters_prefix(customer, meter.name, window)
        keys = [prefix + start_id(window, s) for s in starts]
        fold = _FOLDS.get(meter.aggregation, "sum")
        kept, *rows = await self._rank(keys=keys, args=[fold, top])
        fields = [f.decode() for f in kept]
        found: dict[datetime, dict[str, int]] = {}
        for bucket, row in zip(starts, rows, strict=True):
            if row is not None:
                found[bucket] = {
                    f: int(v) for f, v in zip(fields, row, strict=True) if v is not None
                }
        return found

    async def _from_rollups(
        self, customer: str, meter: Meter, window: Window, starts: Sequence[datetime], grouped: bool
    ) -> dict[datetime, dict[str, int]]:
        if not starts:
            return {}
        table, column = (
            ("usage_daily", "day") if window is Window.DAY else ("usage_monthly", "month")
        )
        async with postgres.reading(self._pool) as conn:
            cur = await conn.execute(
                f"SELECT {column}, group_key, value FROM {table}"
                f" WHERE customer = %s AND meter = %s AND {column} = ANY(%s)"
                f" AND group_key {'<>' if grouped else '='} '*'",  # '=': on the primary key
                (customer, meter.name, [s.date() for s in starts]),
            )
            rows = await cur.fetchall()
        found: dict[datetime, dict[str, int]] = {}
        for day, group_key, value in rows:
            start = datetime.combine(day, time(), UTC)
            found.setdefault(start, {})[group_key] = to_micros(value)
        return found
