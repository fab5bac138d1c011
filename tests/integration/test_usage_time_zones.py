"""Usage in a customer's time zone: local days of 23 and 25 hours around the clock
changes, months, maxima, live hours from Redis and older ones from the hourly rollups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.catalog import Meter
from schemas.events import utcnow
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.integration.test_usage_api import aggregate, api, call, meter_cache, usage

__all__ = ["api", "meter_cache"]  # the fixtures this module uses


async def _hourly(
    pool: AsyncConnectionPool, customer: str, meter: str, first: datetime, values: list[int]
) -> None:
    """Rolled-up hours from ``first`` on, as the rollup writes them."""
    async with pool.connection() as conn:
        await conn.cursor().executemany(
            "INSERT INTO usage_hourly (customer, meter, hour, value, watermark)"
            " VALUES (%s, %s, %s, %s, now())",
            [(customer, meter, first + timedelta(hours=i), v) for i, v in enumerate(values)],
        )


async def test_new_york_days_around_the_clock_changes(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-ny"
    # One call an hour from 7 March 2026 05:00 UTC (midnight in New York) for four days;
    # clocks spring forward on the 8th, so that local day has 23 hours.
    await _hourly(pool, customer, "api_calls", datetime(2026, 3, 7, 5, tzinfo=UTC), [1] * 96)
    body = await usage(
        api,
        customer,
        meter="api_calls",
        window="day",
        tz="America/New_York",
        **{"from": "2026-03-07T00:00:00-05:00", "to": "2026-03-10T00:00:00-04:00"},
    )
    assert body["tz"] == "America/New_York"
    assert [(p["start"], p["end"], p["value"]) for p in body["data"]] == [
        ("2026-03-07T00:00:00-05:00", "2026-03-08T00:00:00-05:00", "24"),
        ("2026-03-08T00:00:00-05:00", "2026-03-09T00:00:00-04:00", "23"),
        ("2026-03-09T00:00:00-04:00", "2026-03-10T00:00:00-04:00", "24"),
    ]
    utc = await usage(
        api, customer, meter="api_calls", window="day",
        **{"from": "2026-03-07T00:00:00Z", "to": "2026-03-10T00:00:00Z"},
    )  # fmt: skip
    assert utc["tz"] == "UTC"  # the same hours, UTC days: nothing from usage_daily here
    assert [p["value"] for p in utc["data"]] == ["0", "0", "0"]


async def test_a_month_and_a_maximum_in_tokyo(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-tokyo"
    # 31 October 2026 15:00 UTC is midnight of 1 November in Tokyo (UTC+9).
    await _hourly(pool, customer, "api_calls", datetime(2026, 10, 31, 14, tzinfo=UTC), [5, 7, 9])
    await _hourly(pool, customer, "storage_gb", datetime(2026, 10, 31, 14, tzinfo=UTC), [80, 3, 4])
    months = {"from": "2026-10-01T00:00:00+09:00", "to": "2026-12-01T00:00:00+09:00"}
    body = await usage(api, customer, meter="api_calls", window="month", tz="Asia/Tokyo", **months)
    assert [(p["start"], p["value"]) for p in body["data"]] == [
        ("2026-10-01T00:00:00+09:00", "5"),
        ("2026-11-01T00:00:00+09:00", "16"),
    ]
    peak = await usage(api, customer, meter="storage_gb", window="month", tz="Asia/Tokyo", **months)
    assert [p["value"] for p in peak["data"]] == ["80", "4"]


async def test_live_hours_from_redis_add_up_to_the_utc_total(
    api: httpx.AsyncClient,
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    meters: dict[str, list[Meter]],
    tenant: str,
) -> None:
    customer = f"{tenant}-live"
    now = utcnow()
    events = [
        call(customer, "api_call", f"e{i}", now - timedelta(hours=i), endpoint=f"/{i % 2}")
        for i in range(30)
    ]
    await aggregate(settings, ch, redis, meters, events)
    span = {
        "from": (now - timedelta(days=3)).isoformat(),
        "to": (now + timedelta(minutes=1)).isoformat(),
    }
    for tz in ("Pacific/Auckland", "America/Los_Angeles"):
        body = await usage(api, customer, meter="api_calls", window="day", tz=tz, **span)
        assert sum(Decimal(p["value"]) for p in body["data"]) == 30, tz
        grouped = await usage(
            api, customer, meter="api_calls", window="day", tz=tz, group_by="endpoint", **span
        )
        totals: dict[str, Decimal] = {}
        for point in grouped["data"]:
            key = point["groups"]["endpoint"]
            totals[key] = totals.get(key, Decimal(0)) + Decimal(point["value"])
        assert totals == {"/0": 15, "/1": 15}, tz
    # hours are the same buckets in a whole-hour zone: shown in its offsets, not UTC's
    hours = {"from": (now - timedelta(hours=5)).isoformat(), "to": now.isoformat()}
    utc = await usage(api, customer, meter="api_calls", window="hour", **hours)
    local = await usage(api, customer, meter="api_calls", window="hour", tz="Asia/Tokyo", **hours)
    assert local["tz"] == "Asia/Tokyo" and utc["tz"] == "UTC"
    assert [p["value"] for p in local["data"]] == [p["value"] for p in utc["data"]]
    assert [datetime.fromisoformat(p["start"]) for p in local["data"]] == [
        datetime.fromisoformat(p["start"]) for p in utc["data"]
    ]
    assert all(p["start"].endswith("+09:00") for p in local["data"])
    kolkata = await api.get(
        f"/v1/customers/{customer}/usage",
        params={"meter": "api_calls", "window": "hour", "tz": "Asia/Kolkata", **hours},
    )
    assert kolkata.status_code == 422 and kolkata.json()["errors"][0]["field"] == "query.tz"
