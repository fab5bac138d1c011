"""The benchmarks keep off the user's stores, reserve new events, and their baselines answer."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import orjson
import psutil
import psycopg
import pytest
import redis

from bench import bare_app, edge, middleware_cost, stores, usage
from bench.enforce import reservations
from bench.pinning import layouts, pinning
from services.api.enforcement.enforcer import EnforceRequest
from tests.conftest import REDIS_URL

ACCOUNTS = [(f"cust_{n}", f"tk_{n:04d}") for n in range(3)]


def test_an_empty_or_marked_redis_database_is_the_benchmarks() -> None:
    assert stores.redis_refusal("redis://h/13", 0, None) is None
    assert stores.redis_refusal("redis://h/13", 5_000, b"bench pid 1") is None


def test_a_database_holding_keys_without_the_mark_is_refused_with_the_way_out() -> None:
    refusal = stores.redis_refusal("redis://h/3", 12, None)
    assert refusal is not None
    assert "redis://h/3" in refusal and "12 key(s)" in refusal
    assert stores.OWNER_KEY in refusal and stores.REDIS_VARIABLE in refusal


def test_an_unmarked_database_is_left_as_it_was() -> None:
    """The tests' own Redis database (never a benchmark's) holding one key of someone's."""
    url = REDIS_URL
    client = redis.Redis.from_url(url)
    key = f"someone:else:{uuid.uuid4().hex}"
    client.set(key, "theirs")
    try:
        with pytest.raises(stores.Refused, match="refusing to run"), stores.bench_redis(url):
            pytest.fail("a database holding someone's keys was used")
        assert client.get(key) == b"theirs"
        assert client.get(stores.OWNER_KEY) is None
    finally:
        client.delete(key)
        client.close()


def test_the_users_stores_and_settings_leave_the_environment() -> None:
    theirs = ("DATABASE_URL", "REDIS_URL", "CLICKHOUSE_URL", "TALLY_ENV", "tally_redis_url")
    environ = dict.fromkeys(theirs, "theirs") | {
        stores.REDIS_VARIABLE: "redis://127.0.0.1:6379/13",
        "PATH": "/usr/bin",
    }
    stores.forget_user_settings(environ)
    assert environ == {stores.REDIS_VARIABLE: "redis://127.0.0.1:6379/13", "PATH": "/usr/bin"}


def _parse(raw: bytes) -> tuple[dict[str, str], bytes]:
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    return headers, body


def test_redis_cpu_is_read_off_the_local_server_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """INFO's pid names the server here; a server elsewhere (a container reports pid 1)
    must not charge some local process's CPU to Redis."""
    found = edge.redis_process(REDIS_URL)
    assert found is not None and found.name().startswith("redis-server")
    monkeypatch.setattr(redis.Redis, "info", lambda self, section=None: {"process_id": 1})
    assert edge.redis_process(REDIS_URL) is None


def test_reservations_never_repeat_in_a_round_or_across_rounds() -> None:
    seen: set[str] = set()
    for tag in ("run1r0", "run1r1"):
        for raw in itertools.islice(reservations(8000, ACCOUNTS, tag), 3_000):
            headers, body = _parse(raw)
            assert int(headers["Content-Length"]) == len(body)
            parsed = EnforceRequest.model_validate_json(body)
            assert parsed.mode == "reserve" and parsed.event is not None
            assert parsed.event.id not in seen
            seen.add(parsed.event.id)
    assert len(seen) == 6_000


def test_reservations_carry_the_keys_and_addresses_checks_do() -> None:
    first = [_parse(raw)[0] for raw in itertools.islice(reservations(8000, ACCOUNTS, "t"), 6)]
    assert [h["Authorization"] for h in first] == [f"Bearer {k}" for _, k in ACCOUNTS] * 2
    assert [h["X-Forwarded-For"] for h in first] == [f"203.0.113.{n}" for n in range(6)]


@pytest.mark.parametrize("kind", bare_app.KINDS)
async def test_both_baselines_answer_like_enforce(kind: str) -> None:
    transport = httpx.ASGITransport(app=bare_app.app(kind))
    async with httpx.AsyncClient(transport=transport, base_url="http://bare") as client:
        allowed = await client.post("/v1/enforce", json={"endpoint": "/x", "mode": "check"})
        invalid = await client.post("/v1/enforce", json={"mode": "maybe"})
        ready = await client.get("/readyz")
    assert allowed.status_code == 200 and allowed.json()["allowed"] is True
    assert allowed.headers["RateLimit"] == '"bare";r=1;t=1'
    assert invalid.status_code == 422
    assert ready.status_code == 200
    assert orjson.loads(allowed.content) == orjson.loads(bare_app.ANSWER)


def test_counting_instructions_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``bench.middleware_cost --instructions`` stops with the way out, before minutes of
    valgrind: without valgrind, or with a baseline that holds no SDK (which would
    otherwise measure this checkout's SDK twice, silently)."""
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(SystemExit, match="needs valgrind"):
        middleware_cost.count(None)
    monkeypatch.setattr(shutil, "which", lambda _: "/usr/bin/valgrind")
    with pytest.raises(SystemExit, match="no tally_sdk package"):
        middleware_cost.count(str(tmp_path))


def test_the_run_queue_wait_adds_up_the_threads_of_a_process(tmp_path: Path) -> None:
    """``schedstat``'s second field, in ns, summed over the threads; a thread that ended
    between listing and reading, or a line not as expected, counts nothing."""
    for task, line in {"7": "1200 2000000000 9", "8": "5 500000000 2", "9": "garbled"}.items():
        (tmp_path / "42" / "task" / task).mkdir(parents=True)
        (tmp_path / "42" / "task" / task / "schedstat").write_text(line + "\n")
    (tmp_path / "42" / "task" / "10").mkdir()  # no schedstat: ended
    assert edge.run_queue_wait(42, tmp_path) == 2.5
    assert edge.run_queue_wait(43, tmp_path) is None  # no such process
    own = edge.run_queue_wait(os.getpid())
    assert own is not None and own >= 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_the_app_under_test_gets_its_own_core_though_this_driver_started_it() -> None:
    """``bench.edge``'s apps are children of its driver, which is pinned with the others
    (and its children with it): the app under test must still end on its own core, and
    the others, the idle app and this process off it.  (It did not, for weeks of pinned
    figures: the app ran beside everything else while its core idled.)  At the end each
    is back where it was: this process's other children (a broker the suite started)
    must not stay pinned."""
    started = [subprocess.Popen(["sleep", "30"]) for _ in range(4)]
    app, idle, other, bystander = (psutil.Process(p.pid) for p in started)
    before = {p.pid: os.sched_getaffinity(p.pid) for p in started}
    try:
        with pinning({"tally": app, "plain": idle}, [other, psutil.Process()]) as placed:
            for layout in layouts():
                placed.apply(layout, "tally")
                assert os.sched_getaffinity(app.pid) == layout.app, layout.name
                for process in (idle.pid, other.pid, bystander.pid, 0):
                    assert os.sched_getaffinity(process) == layout.rest, layout.name
            placed.apply(layouts()[0], "tally")  # left pinned: the end must undo it
        # every process pinned is put back, this one's other children too
        assert {pid: os.sched_getaffinity(pid) for pid in before} == before
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_a_runs_tally_cpu_includes_the_work_it_left_less_the_rest() -> None:
    """Tally still busy after a run (here: a process spinning for a second, as when it
    inserts the rows it gathered) is charged for it, once quiet, less its rest share over
    the wait: the figure is the run's whole cost, not what fell inside its window."""
    spinner = (
        "import time\nend = time.process_time() + 1.0\n"
        "while time.process_time() < end: pass\ntime.sleep(60)"
    )
    busy = subprocess.Popen([sys.executable, "-c", spinner])
    try:
        tally = psutil.Process(busy.pid)
        under = edge.Under(apps={}, tally=tally, redis=None, at_rest={"tally": 0.1})
        before = {"tally": edge.cpu(tally)}
        charged = asyncio.run(edge.deferred(under, before))
        assert 0.9 < edge.cpu(tally) - before["tally"] < 1.2  # it spun, then went quiet
        waited = charged["tally"] - (edge.cpu(tally) - before["tally"])
        assert -0.1 * edge.QUIET_MAX_SECONDS < waited < 0  # the rest share, taken off
        assert charged["tally"] > 0.7
    finally:
        busy.kill()
        busy.wait()


def test_the_stand_in_tally_grants_terms_as_long_as_asked_and_stops_on_leaving() -> None:
    """``bench.edge``'s ``tally_elsewhere`` renews as often as against Tally: its
    stand-in's terms last ``ttl_ms``; and it leaves no process behind."""
    with middleware_cost.stand_in_tally(ttl_ms=2000) as (url, process):
        asked = {"customer": "cus_1", "meter": "api_calls", "endpoint": "/v1/x", "want": 50}
        reply = httpx.post(f"{url}/v1/leases", json=asked, timeout=10)
        assert reply.status_code == 200, reply.text
        assert (reply.json()["granted"], reply.json()["ttl_ms"]) == (50, 2000)
    assert process.wait(10) == 0


def test_the_usage_bench_counts_the_cpu_of_the_local_stores_servers(database_url: str) -> None:
    """``bench.usage`` reports what a read costs Redis and PostgreSQL: their servers
    here, with PostgreSQL's backends — a query's work shows, on its own server."""
    servers = usage.store_servers(REDIS_URL, database_url)
    assert set(servers) == {"redis", "postgresql"}
    assert psutil.Process(servers["postgresql"]).name() == "postgres"
    with psycopg.connect(database_url) as conn:  # open while measured: its backend counts
        before = usage.store_cpu(servers)
        conn.execute("SELECT count(*) FROM generate_series(1, 3000000)").fetchone()
        after = usage.store_cpu(servers)
    spent = {
        store: sum(v - before.get((s, pid), 0.0) for (s, pid), v in after.items() if s == store)
        for store in servers
    }
    assert spent["postgresql"] > 0.05 and spent["redis"] < 0.05
