"""Edge benchmark: what limiting costs the API it protects — plain, slowapi, Tally.

Starts a ``tally up``-like Tally (``tally up``, all services in one process) on the
benchmark's own stores (``bench.stores``: its PostgreSQL database, its Redis database,
a temporary directory), signs up customers on a plan with generous limits, and serves
the same small FastAPI API (``bench.edge_app``) three ways, each in its own uvicorn
process: plain, behind slowapi (limits in the same Redis), behind ``TallyMiddleware``
(``tally``: calls admitted from leases held in the app, its default; ``tally_remote``:
every request reserved in Tally over ``/v1/enforce``; each call's ``api_call`` event
batched to ingest).  Then, from
this process (``bench.http_load``, requests carrying a customer's key):

1. flat out, ``--connections`` keep-alive connections, ``--rounds`` interleaved rounds
   (every kind in each): requests/s, and the CPU each served request cost the
   app process and Tally (psutil: CPU over the run ÷ requests; Tally's figure includes
   its children, the embedded Kafka broker);
2. offered ``--rates`` (open loop), the kinds interleaved per round too: p50/p99
   latency, the latency Tally adds over plain, and CPU per request.

Medians and the spread (min, max) across rounds, as JSON.  Tally's per-address limit is
off: every request here comes from 127.0.0.1.

    python -m bench.edge --seconds 5 --rounds 3 --rates 1000 2000 [--baseline-sdk old/sdk]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from bench.edge_app import TOKEN
from bench.enforce import ADMIN, dumps, sign_up, spread
from bench.http_load import Result, closed_loop, open_loop, request
from bench.stores import bench_stores
from services.common.broker import free_port
from tests.support import TallyProcess, wait_for

Run = Callable[[], Coroutine[Any, Any, Result]]


def cpu(process: psutil.Process) -> float:
    """CPU seconds of a process and its children so far."""
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def measured(run: Run, app: psutil.Process, tally: psutil.Process) -> dict[str, Any]:
    """One run's summary with CPU µs per request in the app and in Tally."""
    before_app, before_tally = cpu(app), cpu(tally)
    result = await run()
    served = max(1, len(result.latencies))
    return result.summary() | {
        "app_cpu_us": round((cpu(app) - before_app) / served * 1e6),
        "tally_cpu_us": round((cpu(tally) - before_tally) / served * 1e6),
    }


def start_app(
    kind: str, port: int, extra: list[str], log: Path, sdk: str | None = None
) -> subprocess.Popen[bytes]:
    """An ``edge_app`` of ``kind``; ``sdk``: a directory whose ``tally_sdk`` it imports."""
    env = os.environ.copy()
    if sdk is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [sdk, env.get("PYTHONPATH")]))
    with log.open("ab") as out:
        command = [sys.executable, "-m", "bench.edge_app", "--port", str(port)]
        process = subprocess.Popen([*command, *extra], stdout=out, stderr=out, env=env)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{kind} app exited:\n{log.read_text(errors='replace')}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, f"{kind} app ready")
    return process


async def measure(
    args: argparse.Namespace,
    ports: dict[str, int],
    apps: dict[str, psutil.Process],
    tally: psutil.Process,
    keys: list[str],
) -> dict[str, Any]:
    body = orjson.dumps({"q": "berlin"})
    host, conns = "127.0.0.1", args.connections
    requests = {
        kind: [
            request(host, port, "/v1/geocode", body, {"X-API-Key": keys[n % len(keys)]})
            for n in range(len(keys) * 4)
        ]
        for kind, port in ports.items()
    }
    for kind, port in ports.items():  # warm up: connections, caches, Tally's first batches
        await closed_loop(host, port, requests[kind], conns, min(2.0, args.seconds))
    flat: list[dict[str, dict[str, Any]]] = []
    fixed: dict[int, list[dict[str, dict[str, Any]]]] = {rate: [] for rate in args.rates}
    for _ in range(args.rounds):
        flat.append({})
        for kind, port in ports.items():
            run = partial(closed_loop, host, port, requests[kind], conns, args.seconds)
            flat[-1][kind] = await measured(run, apps[kind], tally)
        for rate in args.rates:
            fixed[rate].append({})
            for kind, port in ports.items():
                if kind == "tally_baseline":  # far below these rates: it would only queue
                    continue
                run = partial(open_loop, host, port, requests[kind], rate, args.seconds, 64)
                fixed[rate][-1][kind] = await measured(run, apps[kind], tally)
    return summarise(args, flat, fixed)


def summarise(
    args: argparse.Namespace,
    flat: list[dict[str, dict[str, Any]]],
    fixed: dict[int, list[dict[str, dict[str, Any]]]],
) -> dict[str, Any]:
    def across(rounds: list[dict[str, dict[str, Any]]], metric: str) -> dict[str, Any]:
        return {kind: spread([r[kind][metric] for r in rounds]) for kind in rounds[0]}

    pairs = [("tally", "plain"), ("tally", "slowapi"), ("slowapi", "plain")]
    pairs += [("tally", "tally_remote"), ("tally_remote", "plain")]
    if "tally_baseline" in flat[0]:
        pairs += [("tally", "tally_baseline"), ("tally_baseline", "plain")]
    ratios = [
        {f"{a}_vs_{b}": round(r[a]["per_second"] / r[b]["per_second"], 3) for a, b in pairs}
        for r in flat
    ]
    offered = {}
    for rate, rounds in fixed.items():
        added = [
            {
                "p50_ms": round(r["tally"]["p50_ms"] - r["plain"]["p50_ms"], 2),
                "p99_ms": round(r["tally"]["p99_ms"] - r["plain"]["p99_ms"], 2),
            }
            for r in rounds
        ]
        offered[f"offered_{rate}_per_s"] = {
            "p50_ms": across(rounds, "p50_ms"),
            "p99_ms": across(rounds, "p99_ms"),
            "tally_adds_ms": {m: spread([a[m] for a in added]) for m in ("p50_ms", "p99_ms")},
            "app_cpu_us": across(rounds, "app_cpu_us"),
            "tally_cpu_us": across(rounds, "tally_cpu_us"),
            "statuses_last_round": {k: v["statuses"] for k, v in rounds[-1].items()},
        }
    return {
        "connections": args.connections,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "flat_out_per_s": across(flat, "per_second"),
        "flat_out_ratios": {name: spread([r[name] for r in ratios]) for name in ratios[0]},
        "flat_out_app_cpu_us": across(flat, "app_cpu_us"),
        "flat_out_tally_cpu_us": across(flat, "tally_cpu_us"),
        "flat_out_statuses_last_round": {k: v["statuses"] for k, v in flat[-1].items()},
        **offered,
        "flat_out_per_round": flat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--baseline-sdk",
        help="also serve the API behind another tally_sdk (a directory holding the package, "
        "e.g. an older checkout's sdk/) as kind 'tally_baseline', for before/after figures "
        "(flat out only)",
    )
    args = parser.parse_args()

    with bench_stores("tally-bench-edge-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_ADMIN_TOKEN": ADMIN,
            "TALLY_LOG_LEVEL": "WARNING",
            "TALLY_IP_LIMIT_PER_SECOND": "0",  # every request here comes from 127.0.0.1
        }
        tally = TallyProcess(["up"], env, stores.data_dir / "up.log").start()
        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            keys = [key for _, key in sign_up(tally.url, args.customers)]
            options = {
                "plain": ["--kind", "plain"],
                "slowapi": ["--kind", "slowapi", "--redis-url", stores.redis_url],
                "tally": ["--kind", "tally", "--tally-url", tally.url],
                "tally_remote": ["--kind", "tally_remote", "--tally-url", tally.url],
            }
            sdks = dict.fromkeys(options)
            if args.baseline_sdk:
                options["tally_baseline"] = options["tally"]
                sdks["tally_baseline"] = str(Path(args.baseline_sdk).resolve())
            ports = {kind: free_port() for kind in options}
            for kind, extra in options.items():
                log = stores.data_dir / f"edge-{kind}.log"
                processes[kind] = start_app(kind, ports[kind], extra, log, sdks[kind])
            apps = {kind: psutil.Process(p.pid) for kind, p in processes.items()}
            assert tally.process is not None
            result = asyncio.run(
                measure(args, ports, apps, psutil.Process(tally.process.pid), keys)
            )
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(30)
            tally.stop()
            for kind in processes:  # what went wrong, if anything did
                logged = (stores.data_dir / f"edge-{kind}.log").read_text(errors="replace")
                if logged.strip():
                    print(
                        f"--- {kind} app log (tail)",
                        *logged.splitlines()[-15:],
                        sep="\n",
                        file=sys.stderr,
                    )
    print(dumps(result))


if __name__ == "__main__":
    main()
