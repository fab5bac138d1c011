"""Usage over time for one customer and meter, never computed from raw events.

Buckets still inside their Redis retention are read from the aggregator's live
counters, which are exact and current to the second.  Older day and month buckets —
and live ones Redis has lost, after a flush — come from the ``usage_daily`` /
``usage_monthly`` rollups.  Minute and hour buckets only exist in Redis.
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
from schemas.windows import Window, bucket_expiry, bucket_id, buckets, next_bucket

MAX_BUCKETS = 2000


@dataclass(frozen=True, slots=True)
class Point:
    start: datetime
    end: datetime
    value: Decimal
    groups: dict[str, str] | None

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
        live = [s for s in starts if bucket_expiry(window, s) > now]
        found = await self._from_redis(customer, meter, window, live)
        if window in (Window.DAY, Window.MONTH):
            missing = [s for s in starts if s not in found]
            found |= await self._from_rollups(customer, meter, window, missing, grouped)
        points = []
        for bucket in starts:
            end_ = next_bucket(window, bucket)
            cells = found.get(bucket, {})
            if not grouped:
                value = cells.get(redis_keys.TOTAL, Decimal(0))
                points.append(Point(bucket, end_, value, None))
                continue
            for field, value in sorted(cells.items()):
                if field != redis_keys.TOTAL:
                    groups = dict(zip(meter.group_by, redis_keys.parse_group(field), strict=True))
                    points.append(Point(bucket, end_, value, groups))
        return points

    async def _from_redis(
        self, customer: str, meter: Meter, window: Window, starts: Sequence[datetime]
    ) -> dict[datetime, dict[str, Decimal]]:
        """Buckets Redis holds; a bucket without a key is left out, not reported as 0."""
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
            if not raw:
                continue
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
