"""Usage over time for one customer and meter, never computed from raw events.

Buckets the rollup has not closed yet (they end after its watermark) are read from the
aggregator's Redis counters; closed ones from ``usage_daily`` / ``usage_monthly``.
Minute and hour buckets only exist in Redis, for as long as their retention lasts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.catalog import Meter
from schemas.events import from_micros
from schemas.windows import Window, bucket_id, buckets, next_bucket
from services.common import watermark as watermarks

MAX_BUCKETS = 2000


@dataclass(frozen=True, slots=True)
class Point:
    start: datetime
    end: datetime
    value: Decimal
    groups: dict[str, str] | None
    source: str

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "value": str(self.value),
        }
        if self.groups is not None:
            body["groups"] = self.groups
        return body


class UsageReader:
    def __init__(self, redis: Redis, pool: AsyncConnectionPool) -> None:
        self._redis = redis
        self._pool = pool

    async def read(
        self,
        customer: str,
        meter: Meter,
        window: Window,
        start: datetime,
        end: datetime,
        grouped: bool,
        now: datetime,
    ) -> list[Point]:
        starts = list(buckets(window, start, end))
        watermark = (
            await watermarks.read(self._pool) if window in (Window.DAY, Window.MONTH) else None
        )
        live = [s for s in starts if watermark is None or next_bucket(window, s) > watermark]
        closed = [s for s in starts if s not in set(live)]
        found = await self._from_redis(customer, meter, window, live, grouped)
        found |= await self._from_rollups(customer, meter, window, closed, grouped)
        points = []
        for bucket in starts:
            end_ = next_bucket(window, bucket)
            source = "redis" if bucket in live else "rollup"
            cells = found.get(bucket, {})
            if not grouped:
                value = cells.get(redis_keys.TOTAL, Decimal(0))
                points.append(Point(bucket, end_, value, None, source))
                continue
            for field, value in sorted(cells.items()):
                if field != redis_keys.TOTAL:
                    groups = dict(zip(meter.group_by, redis_keys.parse_group(field), strict=True))
                    points.append(Point(bucket, end_, value, groups, source))
        return points

    async def _from_redis(
        self, customer: str, meter: Meter, window: Window, starts: Sequence[datetime], grouped: bool
    ) -> dict[datetime, dict[str, Decimal]]:
        if not starts:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for bucket in starts:
                pipe.hgetall(
                    redis_keys.counters(customer, meter.name, window, bucket_id(window, bucket))
                )
            hashes = await pipe.execute()
        found: dict[datetime, dict[str, Decimal]] = {}
        for bucket, raw in zip(starts, hashes, strict=True):
            found[bucket] = {
                field.decode(): from_micros(int(value))
                for field, value in raw.items()
                if not field.endswith(redis_keys.TIME_SUFFIX.encode())
            }
        return found

    async def _from_rollups(
        self, customer: str, meter: Meter, window: Window, starts: Sequence[datetime], grouped: bool
    ) -> dict[datetime, dict[str, Decimal]]:
        if not starts:
            return {}
        table, column = (
            ("usage_daily", "day") if window is Window.DAY else ("usage_monthly", "month")
        )
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {column}, group_key, value FROM {table}"
                f" WHERE customer = %s AND meter = %s AND {column} = ANY(%s)"
                f" AND (group_key = '*') = %s",
                (customer, meter.name, [s.date() for s in starts], not grouped),
            )
            rows = await cur.fetchall()
        found: dict[datetime, dict[str, Decimal]] = {}
        for day, group_key, value in rows:
            start = datetime.combine(day, time(), UTC)
            found.setdefault(start, {})[group_key] = value.normalize() + Decimal(0)
        return found
