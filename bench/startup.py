"""`tally up`'s start-up: from launch to ready and to counting, first start and after a
kill -9 under load (issue 15: < 10 s after a crash, with what was pending replayed).

Each start of a round runs on fresh stores (``bench.stores``: a new database, already
migrated, and an empty data directory): a first start, ``--rate`` events/s for
``--load`` seconds, kill -9 of the supervisor (its children and broker die with it),
then ``tally up`` again, timed:

- ``ready``: launch → ``/readyz`` 200 (asked every 50 ms);
- ``counted``: launch → every event acknowledged before the kill counted by the usage API
  (the write-ahead log's replay included).

Rounds are interleaved — each starts every checkout once, in a rotated order — so a
shared machine's drifting load tilts none; with ``--baseline DIR`` the other checkout's
`tally up` (e.g. the main branch, ``git archive main``) runs from that directory.

    python -m bench.startup --rounds 5 [--baseline /tmp/startup-main]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from bench.crash import Ledger, counted, load_then_kill
from bench.pipeline import TOKEN
from bench.stores import bench_stores
from bench.up import working_directory
from tests.support import TallyProcess

READY_EVERY = 0.05
COUNTED_EVERY = 0.05


def launch(env: dict[str, str], log: Path) -> tuple[TallyProcess, float]:
    """A started ``tally up`` and seconds from launch to ready."""
    began = time.monotonic()
    up = TallyProcess(["up"], env, log).start(ready_timeout=120, every=READY_EVERY)
    return up, time.monotonic() - began


def until_counted(up: TallyProcess, ledger: Ledger, began: float, timeout: float) -> float:
    """Seconds from ``began`` until the usage API counts every acknowledged event."""
    want = len(ledger.acknowledged)
    deadline = began + timeout
    while counted(up, ledger.customers) < want:
        if time.monotonic() > deadline:
            raise SystemExit(f"not all {want} events counted in {timeout} s:\n{up.tail()}")
        time.sleep(COUNTED_EVERY)
    return time.monotonic() - began


def one_start(args: argparse.Namespace, checkout: str) -> dict[str, float]:
    baseline = args.baseline if checkout == "baseline" else None
    with bench_stores("tally-bench-startup-") as stores, working_directory(baseline):
        env = stores.env() | {"TALLY_SERVICE_TOKENS": TOKEN, "TALLY_LOG_LEVEL": "INFO"}
        if baseline is not None:
            env["PYTHONPATH"] = f"{baseline}:{baseline / 'sdk'}"
        log = stores.data_dir / "up.log"
        ledger = Ledger(args.customers)
        up, first = launch(env, log)
        crash = argparse.Namespace(rate=args.rate, batch=args.batch, senders=args.senders)
        asyncio.run(load_then_kill(up, ledger, crash, args.load))
        began = time.monotonic()
        up, ready = launch(env, log)
        try:
            counted_s = until_counted(up, ledger, began, 120)
        finally:
            up.stop()
    return {
        "first_ready_s": round(first, 2),
        "restart_ready_s": round(ready, 2),
        "restart_counted_s": round(counted_s, 2),
        "acknowledged": len(ledger.acknowledged),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=2000, help="events/s before the kill")
    parser.add_argument("--load", type=float, default=3.0, help="seconds of load")
    parser.add_argument("--batch", type=int, default=50, help="events per request")
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--customers", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout's `tally up`")
    args = parser.parse_args()
    checkouts = ["this", *(["baseline"] if args.baseline else [])]
    results: dict[str, list[dict[str, float]]] = {c: [] for c in checkouts}
    for number in range(args.rounds):
        order = checkouts[number % len(checkouts) :] + checkouts[: number % len(checkouts)]
        for checkout in order:
            outcome = one_start(args, checkout)
            results[checkout].append(outcome)
            line = {"round": number, "checkout": checkout} | outcome
            print(orjson.dumps(line).decode(), flush=True)
    report: dict[str, Any] = {
        checkout: {
            name: spread([run[name] for run in runs])
            for name in ("first_ready_s", "restart_ready_s", "restart_counted_s")
        }
        for checkout, runs in results.items()
    }
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
