"""kill -9 ``tally up`` under load: every event it answered 202 for is counted once.

The embedded broker keeps topics in memory, so what is durable is ingest's write-ahead
log (``services/ingest/wal``).  ``tally up`` takes ~1,500 events/s from a client that
records every 202, and is killed outright twice on the same data directory:

1. within a millisecond of a 202 (the event is in the broker's memory, surely not yet
   counted: what was lost before the log);
2. at a random moment, together with its broker, as a power cut would end both;

then started a third time.  The client retries the one request that was in flight at
each kill (it got no answer), as a client does.  Every event must be counted exactly
once by the usage API (Redis) and in ClickHouse, and no broker may be left running.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from services.common import clickhouse
from services.common.settings import Settings
from tests.conftest import env_for
from tests.e2e.test_no_orphan import brokers_of, dead
from tests.support import TallyProcess, sample_event, wait_for

pytestmark = pytest.mark.slow
BATCH = 30  # events per request
RATE = 1500  # events per second
HEADERS = {"Authorization": "Bearer test-token"}


class Client(threading.Thread):
    """Posts unique events at ``RATE`` until stopped or the server goes away;
    ``on_ack`` runs right after each 202 (it may kill the server)."""

    def __init__(self, url: str, customer: str, on_ack: Callable[[], bool]) -> None:
        super().__init__(daemon=True)
        self.url, self.customer, self.on_ack = url, customer, on_ack
        self.acknowledged: list[str] = []
        self.in_flight: list[dict[str, Any]] = []  # no answer: the client retries it
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(headers=HEADERS, timeout=30) as http:
            next_at = time.monotonic()
            while not self.stopping.is_set():
                batch = events(self.customer, BATCH)
                try:
                    reply = http.post(f"{self.url}/v1/events", json=batch)
                except httpx.HTTPError:
                    self.in_flight = batch
                    return
                if reply.status_code != 202:
                    self.in_flight = batch
                    return
                self.acknowledged += [e["id"] for e in batch]
                if self.on_ack():
                    return
                next_at += BATCH / RATE
                time.sleep(max(0.0, next_at - time.monotonic()))


def events(customer: str, count: int) -> list[dict[str, Any]]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        sample_event(id=uuid.uuid4().hex, source="durable", subject=customer, time=now)
        for _ in range(count)
    ]


def counted(up: TallyProcess, customer: str) -> Decimal:
    reply = httpx.get(
        f"{up.url}/v1/customers/{customer}/usage",
        params={"meter": "api_calls", "window": "month"},
        headers=HEADERS,
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return sum((Decimal(point["value"]) for point in reply.json()["data"]), Decimal(0))


def kill_now(*processes: psutil.Process) -> None:
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)


def retry(up: TallyProcess, batch: list[dict[str, Any]]) -> list[str]:
    if not batch:
        return []
    reply = httpx.post(f"{up.url}/v1/events", json=batch, headers=HEADERS, timeout=30)
    assert reply.status_code == 202, reply.text
    return [e["id"] for e in batch]


def test_kill_minus_nine_of_tally_up_loses_no_acknowledged_event(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    env = env_for(settings)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # the embedded broker, and so the write-ahead log
    customer = f"{tenant}-c"
    acknowledged: list[str] = []
    retried: list[dict[str, Any]] = []

    # 1. kill -9 of tally up within a millisecond of a 202
    up = TallyProcess(["up"], env, tmp_path / "up-0.log").start()
    assert up.process is not None
    (broker,) = brokers_of(up.process.pid)
    started = time.monotonic()
    target = psutil.Process(up.process.pid)

    def after_three_seconds() -> bool:
        if time.monotonic() - started < 3:
            return False
        kill_now(target)
        return True

    client = Client(up.url, customer, after_three_seconds)
    client.start()
    client.join(30)
    up.process.wait(10)
    acknowledged += client.acknowledged
    retried = client.in_flight
    wait_for(lambda: dead(broker), 3, "the broker to die with tally up")

    # 2. kill -9 of tally up and its broker at once, at a random moment
    up = TallyProcess(["up"], env, tmp_path / "up-1.log").start()
    assert up.process is not None
    acknowledged += retry(up, retried)
    (broker,) = brokers_of(up.process.pid)
    client = Client(up.url, customer, lambda: False)
    client.start()
    time.sleep(random.uniform(1.5, 3.5))
    kill_now(psutil.Process(up.process.pid), broker)
    client.join(30)
    up.process.wait(10)
    acknowledged += client.acknowledged
    wait_for(lambda: dead(broker), 3, "the broker to be gone")

    # 3. the start after: what was pending is replayed, the client retries its request
    up = TallyProcess(["up"], env, tmp_path / "up-2.log").start()
    try:
        acknowledged += retry(up, client.in_flight)
        expected = Decimal(len(acknowledged))
        print(f"{len(acknowledged)} events acknowledged across two kill -9s")
        wait_for(lambda: counted(up, customer) >= expected, 60, "all counted", up.tail)
        time.sleep(2)  # repeats from the replay arrive late, and must be dropped
        assert counted(up, customer) == expected
    finally:
        assert up.stop(signal.SIGINT) == 0, up.tail()
    assert sorted((settings.data_dir / "wal").iterdir()) == []  # trimmed at a graceful stop

    store = clickhouse.connect(settings)
    try:
        [[rows, distinct]] = store.query(
            f"SELECT count(), uniqExact(id) FROM {store.database}.events FINAL"
            " WHERE customer = {customer:String}",
            {"customer": customer},
        )
        ids = {
            row[0]
            for row in store.query(
                f"SELECT id FROM {store.database}.events FINAL WHERE customer = {{c:String}}",
                {"c": customer},
            )
        }
    finally:
        store.close()
    assert (rows, distinct) == (len(acknowledged), len(acknowledged))
    assert ids == set(acknowledged)


def test_a_stop_commits_what_waits_to_be_inserted_without_waiting_it_out(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    """Back gathers raw events for ClickHouse (for an hour here), and front's stop waits
    for what its log holds to be committed: as the stop begins, ``tally up`` tells back
    to insert at once, so the stop takes seconds and leaves the log empty."""
    env = env_for(settings) | {
        "TALLY_AGGREGATOR_INSERT_SECONDS": "3600",
        "TALLY_AGGREGATOR_INSERT_ROWS": "9000000",
        "TALLY_INGEST_MAX_LAG_SECONDS": "0",  # it would read the hour as lag
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # the embedded broker, and so the write-ahead log
    customer = f"{tenant}-stop"
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    try:
        retry(up, events(customer, 20))
        wait_for(lambda: counted(up, customer) == 20, 60, "20 counted", up.tail)
    finally:
        began = time.monotonic()
        assert up.stop(signal.SIGINT) == 0, up.tail()
    assert time.monotonic() - began < 15, up.tail()
    assert sorted((settings.data_dir / "wal").iterdir()) == []
    store = clickhouse.connect(settings)
    try:
        [[rows]] = store.query(
            f"SELECT count() FROM {store.database}.events FINAL WHERE customer = {{c:String}}",
            {"c": customer},
        )
    finally:
        store.close()
    assert rows == 20
