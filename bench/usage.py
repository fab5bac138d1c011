"""Usage-read benchmark: ``GET /v1/customers/{c}/usage`` for a customer with months of data.

Starts ``tally api`` on the benchmark's own stores (``bench.stores``: a fresh PostgreSQL
database, its own Redis database, a temporary directory) and, with the same uvicorn
settings, a bare FastAPI endpoint (``bench.bare_app``'s ``/readyz``) as the baseline.
Seeds one customer's ``api_calls`` as the services leave them: the last 31 days' day
buckets in Redis (the aggregator's live counters: the total and ``--endpoints`` endpoints),
and 75 days of ``usage_daily`` rows (the rollup's). Then reads with a service token:

- ``month_by_day``: the default window, the last 30 days by day (31 points, from Redis);
- ``top5_endpoints``: the same month, ``group_by=endpoint&order_by=value&limit=5``;
- ``older_month``: 30 days that Redis no longer keeps, from ``usage_daily``;

1. flat out from ``wrk`` (``bench.wrk_load``: a closed loop in C, ``--connections``
   keep-alive connections), ``--rounds`` interleaved rounds: reads/s of each and of the
   baseline, then median, min and max; the CPU per read of the server, of the stores'
   servers and of ``wrk``;
2. at an offered ``--rate`` (open loop, ``bench.http_load`` in this process): p50/p99
   latency of each.

``--compare PATH`` serves a second API from another checkout's code (e.g. ``git archive
main | tar -x -C /tmp/main``) on the same stores, measured in the same rounds: a change's
effect side by side, on a machine whose speed drifts.

    python -m bench.usage --seconds 10 --rounds 3 --rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
import psycopg
import redis

from bench import wrk_load
from bench.edge import load_cpu, redis_process
from bench.enforce import dumps, spread, start_bare
from bench.http_load import open_loop, request
from bench.stores import bench_stores
from bench.wrk_load import WrkResult
from schemas import redis_keys
from schemas.events import VALUE_SCALE
from schemas.windows import Window, bucket_id, bucket_start
from services.common.broker import free_port
from tests.support import TallyProcess

TOKEN = "bench-token"
AUTH = f"Bearer {TOKEN}"
CUSTOMER = "bench-usage"
LIVE_DAYS = 31  # in Redis: the default 30-day span's buckets
ROLLUP_DAYS = 75  # in usage_daily: that month and the ones before


def daily(day: int, endpoint: int) -> int:
    """Calls of one endpoint on the day ``day`` days ago: uneven, so a top 5 is a choice."""
    return (endpoint + 1) * 1000 + day * 37 % 500


def seed(redis_url: str, database_url: str, endpoints: int, now: datetime) -> None:
    """The customer's day buckets in Redis and rows in ``usage_daily``, as the aggregator
    and the rollup leave them."""
    today = bucket_start(Window.DAY, now)
    client = redis.Redis.from_url(redis_url)
    with client.pipeline(transaction=False) as pipe:
        for day in range(LIVE_DAYS):
            start = today - timedelta(days=day)
            key = redis_keys.counters(
                CUSTOMER, "api_calls", Window.DAY, bucket_id(Window.DAY, start)
            )
            cells: dict[str | bytes, int] = {
                redis_keys.group_field((f"/v1/e{e}",)): daily(day, e) * VALUE_SCALE
                for e in range(endpoints)
            }
            cells[redis_keys.TOTAL] = sum(cells.values())
            pipe.hset(key, mapping=cells)  # type: ignore[arg-type]  # ints are fine
        pipe.execute()
    client.close()
    rows = []
    for day in range(1, ROLLUP_DAYS + 1):  # closed days only, as the rollup writes them
        date = (today - timedelta(days=day)).date()
        values = [daily(day, e) for e in range(endpoints)]
        rows.append((CUSTOMER, date, redis_keys.TOTAL, sum(values)))
        rows += [(CUSTOMER, date, f'["/v1/e{e}"]', v) for e, v in enumerate(values)]
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO usage_daily (customer, meter, day, group_key, value, watermark)"
            " VALUES (%s, 'api_calls', %s, %s, %s, now())",
            rows,
        )


def paths(now: datetime) -> dict[str, str]:
    """The three reads' paths, query included."""
    base = f"/v1/customers/{CUSTOMER}/usage?"
    older = bucket_start(Window.DAY, now) - timedelta(days=ROLLUP_DAYS - 2)
    queries = {
        "month_by_day": {"meter": "api_calls"},
        "top5_endpoints": {
            "meter": "api_calls",
            "group_by": "endpoint",
            "order_by": "value",
            "limit": "5",
        },
        "older_month": {
            "meter": "api_calls",
            "from": older.isoformat(),
            "to": (older + timedelta(days=30)).isoformat(),
        },
    }
    return {name: base + urlencode(q) for name, q in queries.items()}


def raw_get(port: int, path: str) -> bytes:
    """A read as a raw request, for the open loop."""
    return request("127.0.0.1", port, path, b"", {"Authorization": AUTH}, "GET")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process has used so far, from Linux's /proc: what a
    read costs the server, whatever else the machine is busy with."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def store_servers(redis_url: str, database_url: str) -> dict[str, int]:
    """The stores' server processes, when they run on this host: Redis's (its pid from
    INFO, ``redis_process``) and PostgreSQL's postmaster (a backend's parent)."""
    servers = {}
    redis_server = redis_process(redis_url)
    if redis_server is not None:
        servers["redis"] = redis_server.pid
    with psycopg.connect(database_url) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        # while connected: a backend exits once its connection closes, and then
        # its pid names no process here (the server was missed, now and then)
        with contextlib.suppress(psutil.Error):  # a server elsewhere: not a pid here
            process = psutil.Process(backend[0] if backend else 0)
            parent = process.parent() if process.name() == "postgres" else None
            if parent is not None:
                servers["postgresql"] = parent.pid
    return servers


def store_cpu(servers: dict[str, int]) -> dict[tuple[str, int], float]:
    """CPU seconds so far of each store's server and its children (PostgreSQL's
    backends), by store and pid."""
    found = {}
    for store, pid in servers.items():
        with contextlib.suppress(psutil.Error):
            server = psutil.Process(pid)
            for process in [server, *server.children()]:
                with contextlib.suppress(OSError):  # a backend that ended meanwhile
                    found[(store, process.pid)] = cpu_seconds(process.pid)
    return found


@dataclass
class FlatOut:
    """One flat-out run of a read: ``wrk``'s result, and CPU seconds the server, the
    stores' servers and the load generator spent in it."""

    result: WrkResult
    server_s: float
    stores_s: dict[str, float]
    generator_s: float

    def per_read_us(self, seconds: float) -> float:
        return seconds / max(1, self.result.requests) * 1e6


def flat_out(
    port: int, pid: int, path: str, servers: dict[str, int], connections: int, seconds: float
) -> FlatOut:
    """Reads/s with ``--connections`` in flight from ``wrk`` (C: 20 µs of CPU a top-5
    read, where the Python generator spent 250 on the same two cores), the server's CPU,
    and the stores' CPU in the round (those running here): a read that moves work into a
    Redis script or a query must show it.  A backend that ends within the round takes
    its CPU along (the API's pool keeps its own)."""
    cpu, before, generator = cpu_seconds(pid), store_cpu(servers), load_cpu()
    url = f"http://127.0.0.1:{port}{path}"
    result = wrk_load.closed_loop(
        url, path, b"", [AUTH], connections, seconds, "GET", "Authorization"
    )
    spent = dict.fromkeys(servers, 0.0)
    for (store, process), seconds in store_cpu(servers).items():
        spent[store] += seconds - before.get((store, process), 0.0)
    return FlatOut(result, cpu_seconds(pid) - cpu, spent, load_cpu() - generator)


async def measure(
    args: argparse.Namespace,
    apis: dict[str, tuple[int, int]],
    bare: tuple[int, int],
    servers: dict[str, int],
) -> dict[str, Any]:
    """``apis`` and ``bare``: (port, pid) of each server."""
    now = datetime.now(UTC)
    kinds = {"bare_fastapi": (*bare, "/readyz")}
    for api, (port, pid) in apis.items():
        for name, path in paths(now).items():
            kinds[name if api == "api" else f"{api}:{name}"] = (port, pid, path)
    for port, pid, path in kinds.values():  # warm up: connections, caches, the pool
        flat_out(port, pid, path, servers, args.connections, 1)
    rounds: list[dict[str, FlatOut]] = []
    for _ in range(args.rounds):  # interleaved: this VM's speed drifts within a minute
        rounds.append(
            {
                name: flat_out(port, pid, path, servers, args.connections, args.seconds)
                for name, (port, pid, path) in kinds.items()
            }
        )
    fixed = {
        name: await open_loop("127.0.0.1", port, [raw_get(port, path)], args.rate, args.seconds, 64)
        for name, (port, _, path) in kinds.items()
    }

    def across(figure: Callable[[FlatOut], float]) -> dict[str, dict[str, int]]:
        """Each read's ``figure`` over the rounds: median, min and max."""
        return {
            name: {k: round(v) for k, v in spread([figure(r[name]) for r in rounds]).items()}
            for name in kinds
        }

    def store_us(store: str) -> Callable[[FlatOut], float]:
        return lambda r: r.per_read_us(r.stores_s[store])

    by_store = {store: across(store_us(store)) for store in servers}  # then by read
    return {
        "customer": {
            "live_days": LIVE_DAYS,
            "rollup_days": ROLLUP_DAYS,
            "endpoints": args.endpoints,
        },
        "connections": args.connections,
        "seconds_per_round": args.seconds,
        "flat_out_per_s_per_round": [
            {name: round(r.result.per_second) for name, r in measured.items()}
            for measured in rounds
        ],
        "flat_out_per_s_across_rounds": across(lambda r: r.result.per_second),
        "server_cpu_us_per_read_across_rounds": across(lambda r: r.per_read_us(r.server_s)),
        "stores_cpu_us_per_read_across_rounds": {
            name: {store: by_store[store][name] for store in servers} for name in kinds
        },
        "generator_cpu_us_per_read_across_rounds": across(lambda r: r.per_read_us(r.generator_s)),
        "flat_out_p50_p99_ms_last_round": {
            name: [r.result.p50_ms, r.result.p99_ms] for name, r in rounds[-1].items()
        },
        "flat_out_errors_last_round": {
            name: r.result.summary()["errors"] for name, r in rounds[-1].items()
        },
        f"offered_{args.rate}_per_s": {name: r.summary() for name, r in fixed.items()},
    }


def _pid(process: subprocess.Popen[bytes] | None) -> int:
    assert process is not None
    return process.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved flat-out rounds")
    parser.add_argument("--rate", type=int, default=1000, help="offered reads/s (open loop)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--endpoints", type=int, default=20, help="endpoints in the data")
    parser.add_argument("--compare", help="another checkout whose api to measure alongside")
    args = parser.parse_args()

    with bench_stores("tally-bench-usage-") as stores:
        seed(stores.redis_url, stores.database_url, args.endpoints, datetime.now(UTC))
        env = stores.env() | {"TALLY_SERVICE_TOKENS": TOKEN, "TALLY_LOG_LEVEL": "WARNING"}
        apis = {"api": TallyProcess(["api"], env, stores.data_dir / "api.log")}
        if args.compare:
            other = env | {"PYTHONPATH": args.compare}
            apis["compare"] = TallyProcess(["api"], other, stores.data_dir / "compare.log")
        bare: subprocess.Popen[bytes] | None = None
        try:
            for api in apis.values():
                api.start()
            bare_port = free_port()
            bare = start_bare("fastapi", bare_port, stores.data_dir / "bare.log")
            servers = {name: (api.port, _pid(api.process)) for name, api in apis.items()}
            used = store_servers(stores.redis_url, stores.database_url)
            result = asyncio.run(measure(args, servers, (bare_port, bare.pid), used))
        finally:
            if bare is not None:
                bare.terminate()
                bare.wait(10)
            for api in apis.values():
                if api.process is not None:
                    api.stop()
    print(dumps(result))


if __name__ == "__main__":
    main()
