"""What ingest's write-ahead log costs ``tally up``: WAL on vs off, interleaved rounds.

Each round starts ``tally up`` once with ``TALLY_INGEST_WAL=on`` and once with ``off``
(the order alternates between rounds, so drift of the shared machine falls on both), and
measures over HTTP:

- the 202 latency (request sent → answer) at a fixed ``--rate`` events/s, in requests of
  ``--small`` events paced evenly: p50 and p99;
- seconds from process start to ``/readyz`` 200 (an empty log: the cost of opening it);
- events/s accepted flat out: ``--senders`` clients posting ``--batch``-event requests
  back to back for ``--seconds`` (``bench.pipeline``'s requests and sender).

Before the rounds, the log alone (no HTTP, no broker) in a temporary directory:
``--writers`` concurrent requests appending ``--small`` events' worth of envelopes each
(one per customer, as ingest builds them) back to back for ``--seconds``: appends/s,
events/s, fsyncs per second and the append → durable latency p50/p99.

    python -m bench.wal_cost --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.pipeline import TOKEN, build_requests, sender
from bench.stores import bench_stores
from services.ingest.wal.journal import Journal
from services.ingest.wal.segment import Record
from tests.support import TallyProcess

HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


async def paced(url: str, args: argparse.Namespace) -> list[float]:
    """202 latencies of requests of ``args.small`` events sent at ``args.rate`` events/s."""
    bodies = build_requests(
        argparse.Namespace(batch=args.small, customers=args.customers),
        0,
        int(args.seconds * args.rate / args.small) + 1,
    )
    interval = args.small / args.rate
    latencies: list[float] = []

    async def one(client: httpx.AsyncClient, body: bytes) -> None:
        began = time.perf_counter()
        reply = await client.post("/v1/events", content=body, headers=HEADERS)
        reply.raise_for_status()
        latencies.append(time.perf_counter() - began)

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        tasks = []
        started = time.monotonic()
        for n, body in enumerate(bodies):
            await asyncio.sleep(max(0.0, started + n * interval - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, body)))
        await asyncio.gather(*tasks)
    return latencies


async def flat_out(url: str, args: argparse.Namespace) -> float:
    shape = argparse.Namespace(batch=args.batch, customers=args.customers)
    per_sender = int(args.seconds * 60_000 / args.batch / args.senders) + 2
    bodies = [build_requests(shape, s, per_sender) for s in range(args.senders)]
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.monotonic()
        deadline = started + args.seconds
        sent: list[list[tuple[float, int]]] = [[] for _ in range(args.senders)]
        accepted = await asyncio.gather(
            *(sender(client, bodies[s], deadline, 0.0, sent[s], []) for s in range(args.senders))
        )
        return sum(accepted) / (time.monotonic() - started)


def journal_alone(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    fsyncs = 0
    real_fsync = os.fsync

    def counted_fsync(fd: Any) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    request = [
        Record(f"bench-c{c:03d}".encode(), body)
        for c, body in enumerate(build_requests(argparse.Namespace(batch=5, customers=1), 0, 4))
    ]  # ~4 envelopes of 5 events: a 20-event request over 4 customers
    latencies: list[float] = []

    async def writer(journal: Journal, deadline: float) -> int:
        done = 0
        while time.monotonic() < deadline:
            began = time.perf_counter()
            ticket = journal.append(request)
            await ticket.wait()
            journal.release(ticket, None)
            latencies.append(time.perf_counter() - began)
            done += 1
        return done

    async def run() -> tuple[int, float]:
        journal = Journal.open(directory, 4 * 2**20, 2.0).journal
        started = time.monotonic()
        deadline = started + args.seconds
        done = await asyncio.gather(*(writer(journal, deadline) for _ in range(args.writers)))
        took = time.monotonic() - started
        await journal.close()
        return sum(done), took

    os.fsync = counted_fsync
    try:
        appends, took = asyncio.run(run())
    finally:
        os.fsync = real_fsync
    return {
        "writers": args.writers,
        "appends_per_s": round(appends / took),
        "events_per_s": round(appends * 20 / took),
        "fsyncs_per_s": round(fsyncs / took),
        "append_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "append_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * share) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="0: the log alone only")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rate", type=int, default=2000, help="events/s for the latency")
    parser.add_argument("--small", type=int, default=20, help="events per paced request")
    parser.add_argument("--batch", type=int, default=2000, help="events per flat-out request")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--writers", type=int, default=32, help="the log alone: concurrency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tally-bench-wal-") as scratch:
        alone = journal_alone(args, Path(scratch))
    print("the log alone", alone, flush=True)

    found: dict[str, dict[str, list[float]]] = {
        mode: {"p50_ms": [], "p99_ms": [], "flat_out_per_s": [], "start_s": []}
        for mode in ("on", "off")
    }
    with bench_stores("tally-bench-wal-") as stores:
        env = stores.env() | {"TALLY_SERVICE_TOKENS": TOKEN, "TALLY_LOG_LEVEL": "WARNING"}
        for round_ in range(args.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                log = stores.data_dir / f"up-{round_}-{mode}.log"
                began = time.monotonic()
                up = TallyProcess(["up"], env | {"TALLY_INGEST_WAL": mode}, log).start()
                found[mode]["start_s"].append(time.monotonic() - began)
                try:
                    latencies = asyncio.run(paced(up.url, args))
                    rate = asyncio.run(flat_out(up.url, args))
                finally:
                    up.stop()
                found[mode]["p50_ms"].append(statistics.median(latencies) * 1000)
                found[mode]["p99_ms"].append(percentile(latencies, 0.99) * 1000)
                found[mode]["flat_out_per_s"].append(rate)
                print(mode, {k: round(v[-1], 1) for k, v in found[mode].items()}, flush=True)
    summary: dict[str, Any] = {
        "rate_per_s": args.rate,
        "events_per_paced_request": args.small,
        "events_per_flat_out_request": args.batch,
        "rounds": args.rounds,
        "log_alone": alone,
    }
    for mode, figures in found.items() if args.rounds else ():
        summary[f"wal_{mode}"] = {
            name: {
                "median": round(statistics.median(values), 1),
                "min": round(min(values), 1),
                "max": round(max(values), 1),
            }
            for name, values in figures.items()
        }
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
