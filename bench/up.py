"""`tally up` (a supervisor of processes) against the split layout: events/s counted flat
out, and 202 → visible latency at a paced 10,000 events/s (issue 15's targets: `tally up`
counts at least what the split layout counts; p99 < 1 s at 10k/s).

Rounds are interleaved — each round starts every layout once, in a rotated order, on
fresh stores (``bench.stores``) — so a machine whose load drifts (this one is shared)
tilts no layout; the medians and the spread over rounds are printed.  Each start runs
``bench.pipeline``'s drive twice: flat out, then paced, on distinct customers.

Paced is issue 15's workload: 10,000 events/s offered as 100-event requests (each over
the run's customers, 50 by default: about 50 records a request, as a busy API's
batches look) from 20 senders, each at its own phase on an even schedule (they start
late only when an answer takes longer than their interval: ``started_late_p99_ms``
says whether the offered rate held).  Per request, the time from its 202 to its probe
event counted in the live counters (Redis): p50, p99 and max; and the events/s counted.

Layouts: ``up`` (this code's `tally up`), ``split`` (Tansu + `tally ingest` + `tally
aggregator`), and with ``--baseline DIR`` ``up@baseline``: `tally up` from another
checkout (e.g. the main branch's one-process `tally up`), run from that directory.

    python -m bench.up --rounds 3 --seconds 15 [--baseline /work/main]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson

from bench.pipeline import TOKEN, drive, start_services
from bench.stores import bench_stores

PACED_RATE = 10_000


@contextlib.contextmanager
def working_directory(path: Path | None) -> Iterator[None]:
    """``python -m`` imports from its working directory first: a baseline checkout's
    processes are started from it."""
    if path is None:
        yield
        return
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def one_start(args: argparse.Namespace, layout: str, number: int) -> dict[str, Any]:
    baseline = args.baseline if layout.endswith("@baseline") else None
    with bench_stores("tally-bench-up-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_LOG_LEVEL": "WARNING",
            "TALLY_KAFKA_SESSION_TIMEOUT": "6",
        }
        env |= dict(setting.split("=", 1) for setting in args.set)
        if baseline is not None:
            env["PYTHONPATH"] = str(baseline)
        run = argparse.Namespace(**vars(args), layout=layout.split("@")[0], rate=0)
        with ExitStack() as stack, working_directory(baseline):
            ingest = start_services(run, env, stores.data_dir, stack)
            outcome = {}
            if args.only in (None, "flat"):
                flat = _with(run, tag=f"flat{number}")
                outcome["flat"] = asyncio.run(drive(flat, ingest.url, stores.redis_url))
            if args.only in (None, "paced"):
                paced = _with(
                    run,
                    tag=f"paced{number}",
                    rate=PACED_RATE,
                    batch=args.paced_batch,
                    senders=args.paced_senders,
                )
                outcome["paced"] = asyncio.run(drive(paced, ingest.url, stores.redis_url))
    return outcome


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**(vars(args) | changes))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    figures = {
        "flat": ["counted_per_s", "accepted_per_s", "refused_503"],
        "paced": [
            "visible_p50_ms",
            "visible_p99_ms",
            "visible_max_ms",
            "accepted_per_s",
            "counted_per_s",
            "started_late_p99_ms",
        ],
    }
    return {
        f"{mode}_{name}": spread([r[mode][name] for r in runs])
        for mode, names in figures.items()
        if all(mode in r for r in runs)
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2000, help="events per request")
    parser.add_argument("--senders", type=int, default=4, help="concurrent HTTP senders")
    parser.add_argument("--paced-batch", type=int, default=100, help="events per paced request")
    parser.add_argument(
        "--paced-senders", type=int, default=20, help="paced senders (each at rate/senders)"
    )
    parser.add_argument("--target", type=int, default=60_000, help="events/s to pre-build for")
    parser.add_argument("--layouts", default="up,split", help="of up and split, comma-separated")
    parser.add_argument("--only", choices=["flat", "paced"], help="run one of the two drives")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every layout's processes, e.g. TALLY_AGGREGATOR_BATCH_SECONDS=0.1",
    )
    parser.add_argument("--baseline", type=Path, help="another checkout's `tally up` to compare")
    args = parser.parse_args()
    layouts = args.layouts.split(",") + (["up@baseline"] if args.baseline else [])
    results: dict[str, list[dict[str, Any]]] = {layout: [] for layout in layouts}
    for number in range(args.rounds):
        order = layouts[number % len(layouts) :] + layouts[: number % len(layouts)]
        for layout in order:
            outcome = one_start(args, layout, number)
            results[layout].append(outcome)
            print(orjson.dumps({"round": number, "layout": layout} | outcome).decode(), flush=True)
    report = {layout: summary(runs) for layout, runs in results.items()}
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
