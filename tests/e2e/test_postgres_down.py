"""PostgreSQL blackholed, then cut, under a running ``tally up`` while events flow and
billing's loops (rollup, billing run, lifecycle scan, notifier, alerts) run every second:

- a read that needs PostgreSQL answers 503 ``store-unavailable`` within its bound
  (``TALLY_POSTGRES_ANSWER_TIMEOUT`` for a connection gone silent mid-query, connect and
  pool timeouts for a new one);
- ingest with a service token keeps answering 202 and the aggregator keeps counting
  (neither needs PostgreSQL: the meters are cached in memory);
- the loops log and wait for their next pass: no crash, no spinning;
- PostgreSQL back: readiness returns, the loops and the meter listener reconnect, and
  every acknowledged event is counted exactly once;
- SIGTERM with PostgreSQL blackholed stops the process within 10 s.
"""

from __future__ import annotations

import signal
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from schemas import redis_keys
from schemas.events import from_micros, utcnow
from schemas.windows import Window, bucket_id
from services.common.settings import DEV_ADMIN_TOKEN, Settings
from tests.conftest import env_for
from tests.e2e.test_faults import behind, counted, events, post
from tests.faults import FaultProxy
from tests.support import TallyProcess, new_customer, wait_for

pytestmark = pytest.mark.slow
ANSWER = 2.0  # TALLY_POSTGRES_ANSWER_TIMEOUT here
READ_BOUND = ANSWER + 2 + 2  # a silent connection, or a new one: connect 2 s + pool wait 2 s
OUTAGE = 6.0  # seconds each fault lasts
SERVICE = {"Authorization": "Bearer test-token"}


def counted_in_redis(client: redis.Redis, customer: str) -> Decimal:
    key = redis_keys.counters(customer, "api_calls", Window.DAY, bucket_id(Window.DAY, utcnow()))
    return from_micros(int(client.hget(key, redis_keys.TOTAL) or 0))


def read_invoices(up: TallyProcess, customer: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = httpx.get(f"{up.url}/v1/customers/{customer}/invoices", headers=SERVICE, timeout=30)
    return reply, time.monotonic() - started


def errors_logged(up: TallyProcess) -> int:
    return sum("[error" in line for line in up.log.read_text(errors="replace").splitlines())


def test_postgresql_down_under_tally_up_degrades_then_recovers_counting_each_event_once(
    settings: Settings, tmp_path: Path
) -> None:
    database = urlsplit(settings.database_url)
    client = redis.Redis.from_url(settings.redis_url)
    with FaultProxy(database.port or 5432, database.hostname or "127.0.0.1") as pg:
        env = env_for(settings) | {
            "DATABASE_URL": behind(settings.database_url, pg),
            "TALLY_POSTGRES_ANSWER_TIMEOUT": str(ANSWER),
            "TALLY_ROLLUP_INTERVAL_SECONDS": "1",
            "TALLY_BILLING_INTERVAL_SECONDS": "1",
            "TALLY_LIFECYCLE_INTERVAL_SECONDS": "1",
            "TALLY_ALERTS_RECOMPILE_SECONDS": "1",
            "TALLY_METER_REFRESH_SECONDS": "1",
            "TALLY_ADMIN_TOKEN": DEV_ADMIN_TOKEN,
        }
        up = TallyProcess(["up"], env, tmp_path / "up.log").start()
        try:
            with httpx.Client(base_url=up.url, timeout=30) as admin:
                customer, _ = new_customer(admin)  # one with invoices to list: none yet
            assert post(up, events(customer, "before", 5))[0].status_code == 202
            wait_for(lambda: counted(up, customer) == 5, 60, "5 counted", up.tail)
            assert read_invoices(up, customer)[0].status_code == 200
            errors_before = errors_logged(up)

            for fault in (pg.blackhole, pg.cut):
                fault()
                name = fault.__name__
                started = time.monotonic()
                reply, took = read_invoices(up, customer)
                print(f"PostgreSQL {name}: invoices read {reply.status_code} in {took:.2f}s")
                assert reply.status_code == 503, reply.text
                assert reply.headers["content-type"].startswith("application/problem+json")
                assert reply.json()["type"].endswith("/store-unavailable")
                assert reply.json()["store"] == "postgresql"
                assert took < READ_BOUND
                accepted, took = post(up, events(customer, f"during-{name}", 5))
                print(f"PostgreSQL {name}: ingest {accepted.status_code} in {took:.2f}s")
                assert accepted.status_code == 202, accepted.text
                assert took < 2.0
                time.sleep(max(0.0, OUTAGE - (time.monotonic() - started)))
                assert up.process is not None and up.process.poll() is None, up.tail()
            want = Decimal(15)
            wait_for(lambda: counted_in_redis(client, customer) == want, 30, "counted", up.tail)
            logged = errors_logged(up) - errors_before
            print(f"{logged} error lines in {2 * OUTAGE:.0f}s of outage")
            assert 0 < logged < 20 * 2 * OUTAGE, "the loops spin, or say nothing"

            pg.restore()
            wait_for(
                lambda: httpx.get(f"{up.url}/readyz", timeout=5).status_code == 200,
                30,
                "ready again",
                up.tail,
            )
            assert read_invoices(up, customer)[0].status_code == 200
            assert post(up, events(customer, "after", 5))[0].status_code == 202
            wait_for(lambda: counted(up, customer) >= 20, 60, "20 counted", up.tail)
            time.sleep(1)
            assert counted(up, customer) == 20  # each acknowledged event once

            pg.blackhole()  # and SIGTERM with the loops, the listener and a pool hung on it
            started = time.monotonic()
            code = up.stop(signal.SIGTERM, timeout=30)
            took = time.monotonic() - started
            print(f"SIGTERM with PostgreSQL blackholed: exit {code} after {took:.2f}s")
            assert took < 10.0, up.tail()
        finally:
            client.close()
            pg.restore()
            up.stop(signal.SIGTERM)
