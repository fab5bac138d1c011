"""Billing run benchmark: one month of invoices for many customers, each using 4 meters.

Seeds a fresh PostgreSQL database of its own (``bench.stores``: never ``DATABASE_URL``;
dropped afterwards) with ``--customers`` customers on a plan pricing four meters — a
count, a max, a sum and a latest, the four aggregations the daily rollups serve — and
``--days`` days of rolled-up usage per customer and meter, then times the billing run
that invoices them all, and a second run that finds nothing to change.  Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.stores import bench_database, forget_user_settings
from schemas.catalog import Catalog
from services.billing.invoicing.run import BillingRun

MONTH = date(2026, 10, 1)
PLAN = """
meters:
  - {name: api_calls, event_type: api_call, aggregation: count}
  - {name: storage_gb, event_type: storage, aggregation: max}
  - {name: compute_seconds, event_type: compute, aggregation: sum}
  - {name: seats, event_type: seat, aggregation: latest}
plans:
  - id: bench
    name: Bench
    price: "99"
    prices:
      api_calls:
        model: graduated
        tiers:
          - {up_to: 10000, unit_price: "0"}
          - {up_to: 100000, unit_price: "0.001"}
          - {up_to: null, unit_price: "0.0005"}
      storage_gb: {model: volume, tiers: [{up_to: 100, unit_price: "0.25"},
                                          {up_to: null, unit_price: "0.15"}]}
      compute_seconds: {model: package, package_size: 3600, unit_price: "1.50"}
      seats: {model: per_unit, included: 5, unit_price: "12", minimum: "10"}
"""


def seed(url: str, customers: int, days: int) -> int:
    rng = random.Random(7)
    since = datetime(2026, 9, 15, tzinfo=UTC)
    rows = 0
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY customers (id, email, plan_id, status, created_at) FROM STDIN") as copy:
            for n in range(customers):
                copy.write_row((f"c{n:07d}", f"c{n}@example.com", "bench", "active", since))
        with cur.copy(
            "COPY usage_daily (customer, meter, day, value, latest_at, watermark) FROM STDIN"
        ) as copy:
            for n in range(customers):
                for day in rng.sample(range(31), days):
                    when = datetime.combine(MONTH + timedelta(days=day), datetime.min.time(), UTC)
                    for meter, top in (
                        ("api_calls", 20_000),
                        ("storage_gb", 300),
                        ("compute_seconds", 5_000),
                        ("seats", 40),
                    ):
                        copy.write_row(
                            (f"c{n:07d}", meter, when.date(), rng.randint(0, top), when, when)
                        )
                        rows += 1
    return rows


async def bill(url: str, batch: int) -> dict[str, Any]:
    async with AsyncConnectionPool(url, open=False) as pool:
        run = BillingRun(pool, _no_clickhouse, timedelta(hours=24), batch=batch)
        now = datetime(2026, 11, 21, tzinfo=UTC)
        started = time.perf_counter()
        first = await run.run(MONTH, now=now, finalize=False)
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        again = await run.run(MONTH, now=now, finalize=False)
        again_seconds = time.perf_counter() - started
    return {
        "invoices_written": first.written,
        "run_seconds": round(first_seconds, 2),
        "invoices_per_second": round(first.written / first_seconds),
        "rerun_written": again.written,
        "rerun_seconds": round(again_seconds, 2),
    }


def _no_clickhouse() -> Any:
    raise AssertionError("no distinct-count meter is priced")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=3, help="days of usage per customer")
    parser.add_argument("--batch", type=int, default=5000, help="customers per transaction")
    args = parser.parse_args()

    forget_user_settings()
    with bench_database(Catalog.from_yaml(PLAN)) as url:
        started = time.perf_counter()
        rows = seed(url, args.customers, args.days)
        seeded = time.perf_counter() - started
        result = {
            "customers": args.customers,
            "meters": 4,
            "usage_daily_rows": rows,
            "seed_seconds": round(seeded, 1),
            **asyncio.run(bill(url, args.batch)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
