"""Rollups from ClickHouse into usage_daily/usage_monthly: exact, idempotent, late-proof."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

from schemas.envelope import StoredEvent
from schemas.events import utcnow
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.billing.rollup.job import Rollup
from services.common import clickhouse
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.conftest import env_for
from tests.support import TALLY

Cell = tuple[str, str, date, str]


def event(
    customer: str, kind: str, ident: str, at: datetime, value: str = "1", **dims: str
) -> StoredEvent:
    return StoredEvent(ident, "src", kind, customer, at, Decimal(value), dims, utcnow())


async def cells(pool: AsyncConnectionPool, table: str, customer: str) -> dict[Cell, Decimal]:
    column = {"usage_daily": "day", "usage_monthly": "month", "usage_hourly": "hour"}[table]
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT meter, {column}, group_key, value FROM {table} WHERE customer = %s",
            (customer,),
        )
        return {(customer, m, b, g): v.normalize() + 0 for m, b, g, v in await cur.fetchall()}


async def test_days_and_months_per_aggregation(
    ch: ClickHouse, pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-r"
    day1 = datetime(2026, 10, 31, 23, 59, tzinfo=UTC)
    day2 = datetime(2026, 11, 1, 0, 1, tzinfo=UTC)
    await ClickHouseSink(ch).write(
        [
            event(customer, "api_call", "a", day1, endpoint="/x"),
            event(customer, "api_call", "b", day2, endpoint="/x"),
            event(customer, "api_call", "c", day2, endpoint="/y"),
            event(customer, "compute", "d", day2, "0.000001"),
            event(customer, "compute", "e", day2, "2.5"),
            event(customer, "storage", "f", day1, "7"),
            event(customer, "storage", "g", day1, "3"),
            event(customer, "user", "h", day2, user="ann"),
            event(customer, "user", "i", day2, user="ann"),
            event(customer, "user", "j", day2, user="bob"),
            event(customer, "api_call", "a", day1, endpoint="/x"),  # a replay: collapses
        ]
    )
    await Rollup(ch, pool, timedelta(0)).run_range(day1.date(), day2.date())
    oct31, nov1 = day1.date(), day2.date()
    assert await cells(pool, "usage_daily", customer) == {
        (customer, "api_calls", oct31, "*"): 1,
        (customer, "api_calls", oct31, '["/x"]'): 1,
        (customer, "api_calls", nov1, "*"): 2,
        (customer, "api_calls", nov1, '["/x"]'): 1,
        (customer, "api_calls", nov1, '["/y"]'): 1,
        (customer, "compute_seconds", nov1, "*"): Decimal("2.500001"),
        (customer, "storage_gb", oct31, "*"): 7,
        (customer, "active_users", nov1, "*"): 2,
    }
    monthly = await cells(pool, "usage_monthly", customer)
    assert monthly[(customer, "api_calls", date(2026, 10, 1), "*")] == 1
    assert monthly[(customer, "api_calls", date(2026, 11, 1), "*")] == 2
    hourly = await cells(pool, "usage_hourly", customer)
    eleven_pm, midnight = day1.replace(minute=0), day2.replace(minute=0)
    assert hourly[(customer, "api_calls", eleven_pm, '["/x"]')] == 1
    assert hourly[(customer, "api_calls", midnight, "*")] == 2
    assert hourly[(customer, "storage_gb", eleven_pm, "*")] == 7
    assert len(hourly) == 8  # as many as the days: each day's events fall in one hour


async def test_rerunning_changes_nothing_and_a_late_event_corrects_its_day(
    ch: ClickHouse, pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-late"
    three_days_ago = utcnow() - timedelta(days=3)
    sink, rollup = ClickHouseSink(ch), Rollup(ch, pool, timedelta(0))
    await sink.write([event(customer, "compute", "1", three_days_ago, "1.5")])
    await rollup.run_incremental()
    first = await cells(pool, "usage_daily", customer)
    await rollup.run_incremental()
    await rollup.run_range(three_days_ago.date(), three_days_ago.date())
    assert await cells(pool, "usage_daily", customer) == first
    await sink.write([event(customer, "compute", "2", three_days_ago, "0.25")])  # arrives late
    report = await rollup.run_incremental()
    assert report.cells == 1
    day = three_days_ago.date()
    assert (await cells(pool, "usage_daily", customer))[
        (customer, "compute_seconds", day, "*")
    ] == Decimal("1.75")


def test_billing_rollup_command(settings: Settings, tmp_path: Path, tenant: str) -> None:
    customer = f"{tenant}-cli"
    at = utcnow() - timedelta(days=1)
    client = clickhouse.connect(settings)
    clickhouse.create_schema(client)
    asyncio.run(ClickHouseSink(client).write([event(customer, "api_call", "1", at, endpoint="/z")]))
    client.close()  # chDB: one process at a time
    env = env_for(settings) | {"TALLY_ROLLUP_SAFETY_LAG_SECONDS": "0"}
    day = at.date().isoformat()
    done = subprocess.run(
        [*TALLY, "billing", "rollup", "--from", day, "--to", day],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "rolled up" in done.stdout
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT value FROM usage_daily WHERE customer = %s AND meter = 'api_calls'"
            " AND group_key = '*'",
            (customer,),
        ).fetchone()
    assert row is not None and row[0] == 1
    bad = subprocess.run(
        [*TALLY, "billing", "rollup", "--from", "yesterday", "--to", day],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--from must be a date as YYYY-MM-DD" in bad.stderr


async def test_a_retry_restamped_with_another_time_counts_once_on_its_first_day(
    ch: ClickHouse, pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-retry"
    first = utcnow() - timedelta(days=2)
    sink, rollup = ClickHouseSink(ch), Rollup(ch, pool, timedelta(0))
    await sink.write([event(customer, "compute", "same", first, "4")])
    await rollup.run_incremental()
    await sink.write([event(customer, "compute", "same", utcnow(), "4")])  # SDK re-stamped
    await rollup.run_incremental()
    found = await cells(pool, "usage_daily", customer)
    assert found == {(customer, "compute_seconds", first.date(), "*"): 4}
