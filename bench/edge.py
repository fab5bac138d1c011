"""Edge benchmark: what limiting costs the API it protects — plain, slowapi, Tally.

Starts a ``tally up``-like Tally (``tally up``, all services in one process) on the
benchmark's own stores (``bench.stores``: its PostgreSQL database, its Redis database,
a temporary directory), signs up customers on a plan with generous limits, and serves
the same small FastAPI API (``bench.edge_app``) several ways, each in its own uvicorn
process: plain, behind slowapi (limits in the same Redis), behind ``TallyMiddleware``
(``tally``: calls admitted from leases held in the app, its default; ``tally_remote``:
every request reserved in Tally over ``/v1/enforce``; each call's ``api_call`` event
batched to ingest; ``tally_elsewhere``: as ``tally``, against the stand-in Tally of
``bench.middleware_cost`` in a process of its own, which grants every lease asked for,
with terms as long as Tally's, and answers every batch at once — the seller's API when
Tally runs on another machine, but for the stand-in's own small work on these cores).
Requests carry a customer's key, rotating over ``--customers``.

Two CPU layouts, alternated within every round (``bench.pinning``):

- ``pinned``: the app under test alone on the last core; the load generator, this
  driver, ``tally up`` and its children, the stand-in Tally, the Redis server (its
  affinity is restored at the end) and the idle apps on the other cores, the load
  generator and driver at nice -10 so that Tally's bursts (a batch of events every half
  second) do not delay the requests they send and time.  The app's core is its own, as
  on a seller's server, but ``tally up`` shares the other core with the load generator
  (``tally_elsewhere`` shows the same app against a Tally costing next to nothing there);
- ``shared``: every process on every core, as on one small machine (the app competes
  with the load generator, Tally and Redis).

Other work on the machine (PostgreSQL, other users) is not pinned.  In each round, per
layout, the kinds interleaved, each run once ``tally up`` is quiet again (``quiet``):

1. flat out: ``wrk`` (C, one thread, ``--connections`` keep-alive connections, the keys
   rotated by ``bench/wrk_requests.lua``): requests/s, the ratios between kinds;
2. offered ``--rates`` (open loop, ``bench.http_load``: due times kept, so a stall shows
   as latency), after a second at that rate unmeasured (``LEAD_IN_SECONDS``): p50/p99,
   and what the middleware adds over plain in the same round — at the load generator,
   and inside the app (``bench.in_app``: each request's time from the app taking it to
   its last byte, which leaves out the generator's and the app's waits for a core).

For every run, CPU µs per served request of the app process, of Tally (``tally up``
with its children, the embedded broker), of Redis (shared with whatever else uses it)
— these two charged until ``tally up`` is quiet after the run, so that the work a run
leaves them (rows gathered for the next insert, merges) counts, less their CPU at rest
(``at_rest_cores``, measured once) over that wait — and of the load generator
(``wrk``, or this process for the open loop), from psutil and rusage, and how busy the
app kept its core (``app_core_busy``, CPU s per s: under 1 flat out means the app
waited for load, or for a core other work held).  Which of the
two it was: ``app_waited_for_cpu``, the seconds per second the app's threads were ready
to run but waited on a run queue (the kernel's ``schedstat``), and ``idle_cores``, the
CPU seconds per second the machine left idle meanwhile (a wait while a core idled is the
scheduler placing work, not a shortage of CPU).  Flat out,
``app_capacity_ratios`` divides the apps' CPU per request (``plain``'s ÷ ``tally``'s):
the requests/s ratio the two would reach each saturating a core of its own, the figure
that says what the middleware costs the seller's API when the load generator or Tally
could not keep the app busy.  Medians and the spread (min, max) across rounds, as JSON.
Tally's per-address limit is off: every request here comes from 127.0.0.1.

    python -m bench.edge --seconds 5 --rounds 3 --rates 1000 2000 [--baseline-sdk old/sdk]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from bench import wrk_load
from bench.edge_app import TOKEN
from bench.enforce import ADMIN, dumps, sign_up, spread
from bench.http_load import Result, open_loop, request
from bench.in_app import PATH as TIMINGS
from bench.middleware_cost import stand_in_tally
from bench.pinning import Pinning, layouts, pinning
from bench.stores import bench_stores
from bench.wrk_load import WrkResult
from services.common.broker import free_port
from services.common.settings import Settings
from tests.support import TallyProcess, wait_for

Run = Callable[[], Coroutine[Any, Any, Result | WrkResult]]
LEAD_IN_SECONDS = 1.0
"""Before each run at a fixed rate, this long at that rate unmeasured: the run measures
the steady state.  The kinds ran one after another, so the Tally app's leases ran out
meanwhile (a term lasts 2 s): every customer's first call of a run would wait for a
lease, 50 of 5,000 calls, the whole of the p99.  Its p99 is reported (``lead_in``)."""
LEASE_TTL_MS = Settings.model_fields["lease_ttl_ms"].default
"""The stand-in Tally's terms last as long as Tally's own: the app renews as often."""
QUIET_SHARE = 0.15
QUIET_MAX_SECONDS = 20.0
AT_REST_SECONDS = 3.0
PATH = "/v1/geocode"
BODY = b'{"q":"berlin"}'


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


def run_queue_wait(pid: int, proc: Path = Path("/proc")) -> float | None:
    """Seconds the threads of ``pid`` alive now have spent ready to run but waiting for a
    CPU (the second field of each ``task/*/schedstat``, in ns), or ``None`` where the
    kernel does not say.  Threads that ended take their share along: read it around a
    run of a long-lived process."""
    waited = 0
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            waited += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile, or nothing to read
    return waited / 1e9


def idle_cpu() -> float:
    """CPU seconds every core of the machine has been idle so far."""
    return float(psutil.cpu_times().idle)


def load_cpu() -> float:
    """CPU seconds of this process (the Python load generator) and of its children
    reaped so far (``wrk``, the only ones reaped while the benchmark measures)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Under:
    """The processes whose CPU a run accounts for; ``redis`` is shared with whatever
    else uses that server (other work on the machine included).  ``at_rest``: the share
    of a core each of ``tally`` and ``redis`` spends when nothing is sent."""

    apps: dict[str, psutil.Process]
    tally: psutil.Process
    redis: psutil.Process | None
    at_rest: dict[str, float] = field(default_factory=dict)

    def stores(self) -> dict[str, psutil.Process]:
        return {"tally": self.tally} | ({"redis": self.redis} if self.redis else {})


async def quiet(tally: psutil.Process) -> float:
    """Wait until ``tally up`` has done the work the runs before left it — counting
    their events, inserting the rows it gathers (every 2 s), chDB merging the parts they
    made — so that it is not competing with the next run: until it spends under
    ``QUIET_SHARE`` of a core over half a second (it idles at 0.07 to 0.09 here),
    ``QUIET_MAX_SECONDS`` at most.  Returns the seconds it took."""
    began = time.perf_counter()
    while time.perf_counter() - began < QUIET_MAX_SECONDS:
        before = cpu(tally)
        await asyncio.sleep(0.5)
        if (cpu(tally) - before) / 0.5 < QUIET_SHARE:
            break
    return time.perf_counter() - began


async def at_rest(under: Under, seconds: float = AT_REST_SECONDS) -> dict[str, float]:
    """The share of a core ``tally up`` and Redis spend when nothing is sent: once quiet,
    their CPU over ``seconds``."""
    await quiet(under.tally)
    before = {name: cpu(p) for name, p in under.stores().items()}
    await asyncio.sleep(seconds)
    return {name: (cpu(p) - before[name]) / seconds for name, p in under.stores().items()}


async def measured(run: Run, kind: str, under: Under) -> dict[str, Any]:
    """One run's summary with CPU µs per request in the app, Tally, Redis and the load
    generator."""
    watched = {"app": under.apps[kind]} | under.stores()
    before = {name: cpu(p) for name, p in watched.items()}
    waited, idle_before = run_queue_wait(under.apps[kind].pid), idle_cpu()
    before_load, started = load_cpu(), time.perf_counter()
    result = await run()
    wall = time.perf_counter() - started
    waited_after, idle = run_queue_wait(under.apps[kind].pid), idle_cpu() - idle_before
    summary = result.summary()
    served = max(1, int(summary["requests"]))  # type: ignore[call-overload]
    spent = {name: cpu(p) - before[name] for name, p in watched.items()}
    spent |= await deferred(under, before)
    return (
        summary
        | {f"{name}_cpu_us": round(spent[name] / served * 1e6) for name in spent}
        | {"load_cpu_us": round((load_cpu() - before_load) / served * 1e6)}
        | {"app_core_busy": round(spent["app"] / wall, 2)}
        | (
            {"app_waited_for_cpu": round((waited_after - waited) / wall, 3)}
            if waited is not None and waited_after is not None
            else {}
        )
        | {"idle_cores": round(idle / wall, 2)}
    )


async def deferred(under: Under, before: dict[str, float]) -> dict[str, float]:
    """Tally's and Redis's CPU since ``before`` (a run's start), the work the run left
    them included: the rows gathered for the next insert (up to 2 s of them), the events
    still to count, chDB's merges.  Charged until ``tally up`` is quiet again, less what
    the two spend at rest over the wait, so that a run's figure is its whole cost."""
    waited = await quiet(under.tally)
    return {
        name: cpu(p) - before[name] - under.at_rest[name] * waited
        for name, p in under.stores().items()
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


async def flat_out(url: str, keys: list[str], connections: int, seconds: float) -> WrkResult:
    """``wrk`` in this thread: nothing else runs in this process meanwhile."""
    return wrk_load.closed_loop(url, PATH, BODY, keys, connections, seconds)


async def measure(
    args: argparse.Namespace,
    ports: dict[str, int],
    under: Under,
    placed: Pinning,
    keys: list[str],
) -> dict[str, Any]:
    """Every round: each layout, each kind flat out, then each kind at each rate."""
    host, conns = "127.0.0.1", args.connections
    urls = {kind: f"http://{host}:{port}{PATH}" for kind, port in ports.items()}
    requests = {
        kind: [
            request(host, port, PATH, BODY, {"X-API-Key": keys[n % len(keys)]})
            for n in range(len(keys) * 4)
        ]
        for kind, port in ports.items()
    }
    for kind in ports:  # warm up: connections, caches, Tally's first batches
        await flat_out(urls[kind], keys, conns, min(2.0, args.seconds))
    under.at_rest = await at_rest(under)
    placements = layouts()
    flat: dict[str, list[dict[str, dict[str, Any]]]] = {lay.name: [] for lay in placements}
    fixed: dict[str, dict[int, list[dict[str, dict[str, Any]]]]] = {
        lay.name: {rate: [] for rate in args.rates} for lay in placements
    }
    for _ in range(args.rounds):
        for layout in placements:
            flat[layout.name].append({})
            for kind in ports:
                placed.apply(layout, kind)
                await quiet(under.tally)
                run: Run = partial(flat_out, urls[kind], keys, conns, args.seconds)
                flat[layout.name][-1][kind] = await measured(run, kind, under)
            for rate in args.rates:
                fixed[layout.name][rate].append({})
                for kind, port in ports.items():
                    if kind == "tally_baseline":  # far below these rates: it would only queue
                        continue
                    placed.apply(layout, kind)
                    due: Run = partial(
                        open_loop, host, port, requests[kind], rate, args.seconds, 64
                    )
                    await quiet(under.tally)
                    lead = await open_loop(host, port, requests[kind], rate, LEAD_IN_SECONDS, 64)
                    timings(port)  # forget the lead-in's and the flat-out runs' requests
                    run_figures = await measured(due, kind, under) | in_app(timings(port))
                    run_figures["lead_in_p99_ms"] = round(lead.percentile(0.99), 2)
                    fixed[layout.name][rate][-1][kind] = run_figures
    return {
        lay.name: {"layout": lay.describe(), "at_rest_cores": rounded(under.at_rest)}
        | summarise(args, flat[lay.name], fixed[lay.name])
        for lay in placements
    }


def rounded(shares: dict[str, float]) -> dict[str, float]:
    return {name: round(share, 4) for name, share in shares.items()}


def timings(port: int) -> list[float]:
    """The app's requests' times inside it since the last call (``bench.in_app``)."""
    durations: list[float] = httpx.get(f"http://127.0.0.1:{port}{TIMINGS}", timeout=10).json()
    return durations


def in_app(durations: list[float]) -> dict[str, float]:
    """p50 and p99 of the requests' times inside the app, as the client's are taken."""
    figures = Result(0.0, latencies=durations).median_and_p99(digits=3)
    return {f"in_app_{name}": value for name, value in figures.items()}


Rounds = list[dict[str, dict[str, Any]]]


def across(rounds: Rounds, metric: str) -> dict[str, Any]:
    return {kind: spread([r[kind][metric] for r in rounds]) for kind in rounds[0]}


def added(
    rounds: Rounds, metric: str, to: str = "plain", digits: int = 2, kind: str = "tally"
) -> dict[str, Any]:
    """What the middleware (``kind``'s) adds to ``to``'s figure, round by round (same
    minutes)."""
    return spread([round(r[kind][metric] - r[to][metric], digits) for r in rounds])


def cpu_figures(rounds: Rounds) -> dict[str, Any]:
    names = [m for m in rounds[0]["tally"] if m.endswith("_cpu_us")]
    return {m: across(rounds, m) for m in names} | {
        "app_cpu_us_added_by_tally": added(rounds, "app_cpu_us")
    }


def summarise(
    args: argparse.Namespace,
    flat: Rounds,
    fixed: dict[int, Rounds],
) -> dict[str, Any]:
    pairs = [("tally", "plain"), ("tally", "slowapi"), ("slowapi", "plain")]
    pairs += [("tally", "tally_remote"), ("tally_remote", "plain")]
    pairs += [("tally_elsewhere", "plain"), ("tally", "tally_elsewhere")]
    if "tally_baseline" in flat[0]:
        pairs += [("tally", "tally_baseline"), ("tally_baseline", "plain")]
    ratios = [
        {f"{a}_vs_{b}": round(r[a]["per_second"] / r[b]["per_second"], 3) for a, b in pairs}
        for r in flat
    ]
    offered = {
        f"offered_{rate}_per_s": {
            "p50_ms": across(rounds, "p50_ms"),
            "p99_ms": across(rounds, "p99_ms"),
            "tally_adds_ms": {m: added(rounds, m) for m in ("p50_ms", "p99_ms")},
            "lead_in_p99_ms": across(rounds, "lead_in_p99_ms"),
            "in_app_p50_ms": across(rounds, "in_app_p50_ms"),
            "in_app_p99_ms": across(rounds, "in_app_p99_ms"),
            "tally_adds_in_app_ms": {
                m: added(rounds, m, digits=3) for m in ("in_app_p50_ms", "in_app_p99_ms")
            },
            "tally_elsewhere_adds_ms": {
                m: added(rounds, m, kind="tally_elsewhere") for m in ("p50_ms", "p99_ms")
            },
            "cpu_us_per_request": cpu_figures(rounds),
            "statuses_last_round": {k: v["statuses"] for k, v in rounds[-1].items()},
        }
        for rate, rounds in fixed.items()
    }
    capacity = [
        {f"{a}_vs_{b}": round(r[b]["app_cpu_us"] / r[a]["app_cpu_us"], 3) for a, b in pairs}
        for r in flat
    ]
    return {
        "connections": args.connections,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "flat_out_per_s": across(flat, "per_second"),
        "flat_out_ratios": {name: spread([r[name] for r in ratios]) for name in ratios[0]},
        "flat_out_app_core_busy": across(flat, "app_core_busy"),
        **(
            {"flat_out_app_waited_for_cpu": across(flat, "app_waited_for_cpu")}
            if all("app_waited_for_cpu" in run for r in flat for run in r.values())
            else {}  # the kernel does not say
        ),
        "flat_out_idle_cores": across(flat, "idle_cores"),
        "app_capacity_ratios": {name: spread([r[name] for r in capacity]) for name in capacity[0]},
        "flat_out_cpu_us_per_request": cpu_figures(flat),
        "flat_out_errors_last_round": {k: v["errors"] for k, v in flat[-1].items()},
        **offered,
        "flat_out_per_round": flat,
    }


def redis_process(url: str) -> psutil.Process | None:
    """The local Redis server behind ``url`` (its pid from INFO), if it is on this host:
    a server in a container or elsewhere reports a pid that is some other process here
    (pid 1 is init), so the pid must name a ``redis-server``."""
    with redis.Redis.from_url(url) as client:
        pid = int(client.info("server")["process_id"])
    try:
        process = psutil.Process(pid)
        return process if process.name().startswith("redis-server") else None
    except psutil.Error:
        return None


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

    elsewhere = stand_in_tally(ttl_ms=LEASE_TTL_MS)
    with bench_stores("tally-bench-edge-") as stores, elsewhere as (stand_in_url, stand_in):
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
                "tally_elsewhere": ["--kind", "tally", "--tally-url", stand_in_url],
            }
            sdks = dict.fromkeys(options)
            if args.baseline_sdk:
                options["tally_baseline"] = options["tally"]
                sdks["tally_baseline"] = str(Path(args.baseline_sdk).resolve())
            ports = {kind: free_port() for kind in options}
            for kind, extra in options.items():
                log = stores.data_dir / f"edge-{kind}.log"
                processes[kind] = start_app(kind, ports[kind], extra, log, sdks[kind])
            assert tally.process is not None
            under = Under(
                apps={kind: psutil.Process(p.pid) for kind, p in processes.items()},
                tally=psutil.Process(tally.process.pid),
                redis=redis_process(stores.redis_url),
            )
            others = [under.tally, psutil.Process(), psutil.Process(stand_in.pid)]
            others += filter(None, [under.redis])
            with pinning(under.apps, others) as placed:
                result = asyncio.run(measure(args, ports, under, placed, keys))
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
