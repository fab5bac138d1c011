"""The event loop's longest steps with the middleware in the app: what a request waits for.

On the app's side, the latency the middleware adds at a fixed rate is the loop steps it
runs: each request's decision and event, and now and then a batch's delivery or a
lease renewal.  A step that runs long holds up every request in flight, so p99 follows
the longest steps.  ``bench.edge`` measures the latency itself, on a shared machine,
where other processes' time slices swamp a millisecond; this counts the steps.

It starts ``tally up`` on its own stores (``bench.stores``), signs up ``--customers``,
and runs ``TallyMiddleware`` in-process around a bare ASGI app (no HTTP server) at
``--rate`` calls/s over the customers' keys, on asyncio's own event loop (uvloop's
handles cannot be timed from Python; the SDK's steps are the same code on both), timing
every step by the thread's CPU time (``time.thread_time_ns``: a step preempted by
another process is not charged for it).  The first 2 s are warm-up.  With
``--baseline-sdk``, another ``tally_sdk`` runs the same load in the same rounds, each
SDK in its own process, alternately.  Reports, medians and spread over ``--rounds``:
steps over 0.2, 0.5 and 1 ms per 1,000 calls, the longest step, and the CPU per call
(the driver's loop included, so compare the SDKs, not the absolute figure).

    python -m bench.loop_steps --rate 1000 --seconds 10 --rounds 3 [--baseline-sdk DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
from asyncio import events
from pathlib import Path
from typing import Any

import orjson

from bench.edge_app import TOKEN
from bench.enforce import ADMIN, dumps, sign_up, spread
from bench.stores import bench_stores
from tests.support import TallyProcess

LIMITS_US = (200, 500, 1000)
WARM_UP_S = 2.0


class StepClock:
    """Times every ``Handle._run`` of asyncio's loop by the thread's CPU time."""

    steps: int
    cpu_ns: int
    over: dict[int, int]
    longest_us: float

    def __init__(self) -> None:
        self.reset()

    def install(self) -> None:
        clock, run = self, events.Handle._run

        def timed(handle: events.Handle) -> None:
            started = time.thread_time_ns()
            run(handle)
            clock.record(time.thread_time_ns() - started)

        events.Handle._run = timed  # type: ignore[method-assign,assignment]

    def record(self, spent_ns: int) -> None:
        self.steps += 1
        self.cpu_ns += spent_ns
        micros = spent_ns / 1000
        self.longest_us = max(self.longest_us, micros)
        for limit in LIMITS_US:
            if micros > limit:
                self.over[limit] += 1

    def reset(self) -> None:
        self.steps = self.cpu_ns = 0
        self.over = dict.fromkeys(LIMITS_US, 0)
        self.longest_us = 0.0


async def drive(url: str, keys: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """The middleware at ``rate`` calls/s for ``seconds`` after the warm-up."""
    from tally_sdk import Tally, TallyMiddleware

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def ignore(message: Any) -> None:
        return None

    tally = Tally(url, TOKEN, source="bench-loop-steps")
    app = TallyMiddleware(bare, tally=tally)
    scopes = [
        {
            "type": "http",
            "path": "/v1/geocode",
            "method": "POST",
            "headers": [(b"x-api-key", key.encode())],
            "client": ("127.0.0.1", 1),
        }
        for key in keys
    ]
    clock = StepClock()
    clock.install()
    gc.collect()
    gc.freeze()  # as bench.edge_app does after start-up
    running: set[asyncio.Task[None]] = set()
    total = int(rate * (WARM_UP_S + seconds))
    begin = time.perf_counter()
    for n in range(total):
        delay = begin + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if n == int(rate * WARM_UP_S):
            clock.reset()
        task = asyncio.create_task(app(scopes[n % len(scopes)], receive, ignore))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    calls = total - int(rate * WARM_UP_S)
    result = {
        "steps_per_1000_calls": {
            f"over_{limit}_us": round(clock.over[limit] * 1000 / calls, 2) for limit in LIMITS_US
        },
        "longest_step_us": round(clock.longest_us),
        "loop_cpu_us_per_call": round(clock.cpu_ns / 1000 / calls, 1),
        "undelivered": tally.stats.rejected + tally.stats.refused,
    }
    await tally.aclose()
    return result


def child(args: argparse.Namespace) -> None:
    keys = Path(args.keys_file).read_text().split()
    print(orjson.dumps(asyncio.run(drive(args.url, keys, args.rate, args.seconds))).decode())


def run_child(sdk: str, url: str, keys_file: str, args: argparse.Namespace) -> dict[str, Any]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [sdk, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "bench.loop_steps", "--child", url, keys_file]
    command += ["--rate", str(args.rate), "--seconds", str(args.seconds)]
    done = subprocess.run(command, env=env, capture_output=True, check=False)
    if done.returncode:
        raise RuntimeError(f"loop_steps child failed:\n{done.stderr.decode()}")
    result: dict[str, Any] = orjson.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for sdk, results in runs.items():
        steps = {
            name: spread([r["steps_per_1000_calls"][name] for r in results])
            for name in results[0]["steps_per_1000_calls"]
        }
        summary[sdk] = {
            "steps_per_1000_calls": steps,
            "longest_step_us": spread([r["longest_step_us"] for r in results]),
            "loop_cpu_us_per_call": spread([r["loop_cpu_us_per_call"] for r in results]),
            "undelivered": sum(r["undelivered"] for r in results),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--baseline-sdk", help="another checkout's sdk/ directory")
    parser.add_argument("--child", nargs=2, metavar=("URL", "KEYS_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.url, args.keys_file = args.child
        child(args)
        return
    sdks = {"this_sdk": str(Path(__file__).resolve().parents[1] / "sdk")}
    if args.baseline_sdk:
        sdks["baseline_sdk"] = str(Path(args.baseline_sdk).resolve())
    with bench_stores("tally-bench-steps-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_ADMIN_TOKEN": ADMIN,
            "TALLY_LOG_LEVEL": "WARNING",
            "TALLY_IP_LIMIT_PER_SECOND": "0",
        }
        tally = TallyProcess(["up"], env, stores.data_dir / "up.log").start()
        try:
            keys = [key for _, key in sign_up(tally.url, args.customers)]
            with tempfile.NamedTemporaryFile("w", suffix=".keys") as listed:
                listed.write("\n".join(keys) + "\n")
                listed.flush()
                runs: dict[str, list[dict[str, Any]]] = {sdk: [] for sdk in sdks}
                for _ in range(args.rounds):
                    for name, sdk in sdks.items():
                        runs[name].append(run_child(sdk, tally.url, listed.name, args))
        finally:
            tally.stop()
    print(dumps({"rate": args.rate, "seconds": args.seconds} | summarise(runs)))


if __name__ == "__main__":
    main()
