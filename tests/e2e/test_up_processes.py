"""`tally up` as a supervisor of processes (issue 15): front (ingest + api) on the port,
back (aggregator, billing, analytics SQL) behind it, one embedded broker.  Through the
one port: events are counted, billing's and analytics' routes answer, the OpenAPI
document shows both; a killed back is restarted and counting resumes; SIGTERM stops
every process in order within 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from schemas.events import utcnow
from services.common.broker import free_port
from services.common.settings import DEV_ADMIN_TOKEN, Settings
from services.up import supervisor
from tests.conftest import env_for
from tests.e2e.test_no_orphan import dead
from tests.support import TALLY, TallyProcess, new_customer, sample_event, wait_for

pytestmark = pytest.mark.slow


def role_of(process: psutil.Process) -> str:
    """``front``, ``back`` or ``tansu``: which of `tally up`'s processes this is."""
    command: list[str] = process.cmdline()
    if "--role" in command:
        return command[command.index("--role") + 1]
    return str(process.name())


def processes_of(up: TallyProcess) -> dict[str, psutil.Process]:
    """The live processes under `tally up`, by role (one that is ending is left out)."""
    assert up.process is not None
    found = {}
    for process in psutil.Process(up.process.pid).children(recursive=True):
        try:
            found[role_of(process)] = process
        except psutil.NoSuchProcess:  # ZombieProcess too
            continue
    return found


def stored_rows(client: httpx.Client, admin: dict[str, str], customer: str) -> Any:
    """Analytics SQL's count of the customer's raw events (asked as the admin)."""
    sql = "SELECT count() AS n FROM events WHERE customer = {c:String}"
    rows = client.post(
        "/v1/analytics/sql", json={"sql": sql, "params": {"c": customer}}, headers=admin
    )
    assert rows.status_code == 200, rows.text
    return rows.json()["rows"]


def restarted(up: TallyProcess, before: psutil.Process) -> bool:
    now = processes_of(up).get("back")
    return now is not None and now.pid != before.pid


def test_up_runs_front_and_back_behind_one_port(settings: Settings, tmp_path: Path) -> None:
    env = env_for(settings) | {"TALLY_ADMIN_TOKEN": DEV_ADMIN_TOKEN}
    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # the supervisor starts the embedded broker
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    token = {"Authorization": f"Bearer {settings.service_tokens[0]}"}
    admin = {"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"}
    try:
        children = processes_of(up)
        assert set(children) == {"front", "back", "tansu"}, children
        assert up.process is not None
        assert_placed(psutil.Process(up.process.pid), children, settings)
        with httpx.Client(base_url=up.url, timeout=30) as client:
            customer, _ = new_customer(client)
            send(client, token, customer, 20)
            wait_for(partial(counted, client, token, customer, 20), 60, "20 counted", up.tail)

            # served by back, through front's port
            invoices = client.get(f"/v1/customers/{customer}/invoices", headers=token)
            assert invoices.status_code == 200, invoices.text
            # raw events reach ClickHouse a few batches' worth after the counters
            stored = partial(stored_rows, client, admin, customer)
            wait_for(lambda: stored() == [[20]], 30, "20 rows in analytics SQL", up.tail)
            missing = client.get("/nowhere")
            assert missing.status_code == 404 and missing.json()["type"].endswith("/not-found")
            spec = client.get("/openapi.json").json()["paths"]
            assert {"/v1/events", "/v1/analytics/sql", "/v1/customers/{customer}/invoices"} <= set(
                spec
            )
            ready = client.get("/readyz").json()["checks"]
            assert ready["back.aggregator.clickhouse"] == "ok" and ready["ingest.kafka"] == "ok"

            # back killed outright: the supervisor starts it again, counting resumes
            children["back"].kill()
            wait_for(partial(restarted, up, children["back"]), 30, "a new back", up.tail)
            supervisor = psutil.Process(up.process.pid)
            assert_placed(supervisor, processes_of(up), settings)
            send(client, token, customer, 10)
            wait_for(partial(counted, client, token, customer, 30), 90, "30 counted", up.tail)
            assert "process exited unexpectedly; restarting it" in up.tail(400)

        assert up.process is not None
        everything = processes_of(up) | {"supervisor": psutil.Process(up.process.pid)}
        asked = time.monotonic()
        assert up.stop(signal.SIGTERM, timeout=10) == 0, up.tail()
        for role, process in everything.items():
            left = max(0.1, 10 - (time.monotonic() - asked))
            wait_for(partial(dead, process), left, f"{role} to stop", up.tail)
        print(f"SIGTERM: every process stopped in {time.monotonic() - asked:.2f}s")
    finally:
        if up.process is not None and up.process.poll() is None:
            up.kill()


def assert_placed(
    supervisor: psutil.Process, children: dict[str, psutil.Process], settings: Settings
) -> None:
    """Each child leads a process group of its own (a Ctrl-C in the terminal reaches the
    supervisor alone) in the supervisor's session (one scheduling group under autogroup);
    front runs ``up_front_nice`` nicer than the supervisor, back and the broker
    ``up_background_nice``."""
    base = supervisor.nice()
    for role, child in children.items():
        assert os.getpgid(child.pid) == child.pid, role
        assert os.getsid(child.pid) == os.getsid(supervisor.pid), role
        nicer = settings.up_front_nice if role == "front" else settings.up_background_nice
        wanted = min(19, base + nicer)
        assert child.nice() == wanted, (role, child.nice(), wanted)


def send(client: httpx.Client, token: dict[str, str], customer: str, count: int) -> None:
    now = utcnow().isoformat()
    events = [sample_event(subject=customer, id=uuid.uuid4().hex, time=now) for _ in range(count)]
    reply = client.post("/v1/events", json=events, headers=token)
    assert reply.status_code == 202 and reply.json()["accepted"] == count, reply.text


def counted(client: httpx.Client, token: dict[str, str], customer: str, wanted: int) -> bool:
    usage = client.get(
        f"/v1/customers/{customer}/usage",
        params={"meter": "api_calls", "window": "hour"},
        headers=token,
    )
    return (
        usage.status_code == 200
        and sum(Decimal(p["value"]) for p in usage.json()["data"]) == wanted
    )


def test_up_exits_non_zero_when_its_processes_cannot_start(settings: Settings) -> None:
    """Development secrets in production: each process refuses to start (exit 2), and
    `tally up` stops, says why, and exits 2 rather than restart them for ever."""
    env = env_for(settings) | {"TALLY_ENV": "production", "TALLY_HOST": "127.0.0.1"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS")
    done = subprocess.run(
        [*TALLY, "up", "--port", str(free_port())],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "keeps failing at start" in output and "refuses the development secrets" in output


def test_up_stops_when_its_broker_dies(settings: Settings, tmp_path: Path) -> None:
    """The embedded broker holds the topics and the group's offsets in memory: when it
    dies under `tally up`, the supervisor says so and stops everything, non-zero, instead
    of leaving front taking events nobody will count (the next start replays the log)."""
    env = env_for(settings)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    try:
        children = processes_of(up)
        children["tansu"].kill()
        assert up.process is not None
        code = up.process.wait(30)
        assert code == supervisor.EXIT_BROKER_DIED, up.tail()
        assert "the embedded broker exited" in up.log.read_text(errors="replace")
        for role, process in children.items():
            wait_for(partial(dead, process), 5, f"{role} to stop", up.tail)
    finally:
        if up.process is not None and up.process.poll() is None:
            up.kill()
