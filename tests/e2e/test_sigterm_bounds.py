"""Every split process stops on SIGTERM within 10 s whatever its stores are doing.

One run per process, each with Redis and PostgreSQL both blackholed (the harshest state:
whichever store the process waits for on its way out never answers), and with work in
hand where the process has any: a request in flight at ingest and at the api, a batch at
the aggregator, billing's loops every second. Kafka blackholed is covered for
``tally up`` in ``test_faults.py``; the cross product of process by store is not run, to
keep the suite short. A process ends in order (0) or at its shutdown bound (70, logged),
never killed from outside.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from services.common.settings import Settings
from tests.conftest import REDIS_URL, env_for
from tests.e2e.test_faults import behind, events
from tests.faults import FaultProxy
from tests.probe_support import publish_one
from tests.support import TallyProcess

pytestmark = pytest.mark.slow
BOUND = 10.0
SERVICE = {"Authorization": "Bearer test-token"}


def in_flight(up: TallyProcess, method: str, path: str, body: object = None) -> None:
    """A request sent from a thread and left waiting on the hung store."""

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the process went away under it
            httpx.request(method, f"{up.url}{path}", json=body, headers=SERVICE, timeout=30)

    threading.Thread(target=send, daemon=True).start()
    time.sleep(0.3)


@pytest.mark.parametrize("command", ["ingest", "aggregator", "billing", "api"])
def test_sigterm_with_redis_and_postgresql_blackholed_stops_within_10s(
    settings: Settings, tmp_path: Path, tenant: str, command: str
) -> None:
    redis_url, database = urlsplit(REDIS_URL), urlsplit(settings.database_url)
    with (
        FaultProxy(redis_url.port or 6379, redis_url.hostname or "127.0.0.1") as redis_proxy,
        FaultProxy(database.port or 5432, database.hostname or "127.0.0.1") as pg_proxy,
    ):
        env = env_for(settings) | {
            "REDIS_URL": behind(REDIS_URL, redis_proxy),
            "DATABASE_URL": behind(settings.database_url, pg_proxy),
            "TALLY_KAFKA_SESSION_TIMEOUT": "2",
            "TALLY_ROLLUP_INTERVAL_SECONDS": "1",
            "TALLY_BILLING_INTERVAL_SECONDS": "1",
            "TALLY_LIFECYCLE_INTERVAL_SECONDS": "1",
        }
        process = TallyProcess([command], env, tmp_path / f"{command}.log").start()
        redis_proxy.blackhole()
        pg_proxy.blackhole()
        customer = f"{tenant}-c"
        if command == "ingest":  # a request in flight
            in_flight(process, "POST", "/v1/events", events(customer, "hung", 3))
        elif command == "aggregator":  # a batch in hand, its sinks hung
            publish_one(settings.kafka_bootstrap_servers or "", customer)
            time.sleep(1.0)
        elif command == "api":
            in_flight(process, "GET", f"/v1/customers/{customer}/usage?meter=api_calls")
        else:
            time.sleep(1.5)  # the loops run into the hung stores
        started = time.monotonic()
        code = process.stop(signal.SIGTERM, timeout=30)
        took = time.monotonic() - started
        print(f"tally {command}, Redis and PostgreSQL blackholed: exit {code} after {took:.2f}s")
        assert took < BOUND, process.tail()
        assert code == 0 or (code == 70 and "did not finish in time" in process.tail()), (
            process.tail()
        )
