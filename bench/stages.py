"""What one event costs in each Python stage of ``tally up``, measured in-process.

Builds ``--events`` events shaped as ``TallyMiddleware`` sends them (three dimensions,
every other one spent under a lease, ``--customers`` customers) and times, per event,
each step they take through ingest and the aggregator: the request body's parse,
judging (validation, time bounds, verdicts), the envelopes' encoding, their decoding,
the counter operations (``increments.build``) and the ClickHouse rows' encoding.  No
service, broker or store runs: this is the code's own cost, which end-to-end runs
(``bench.emit_cost``, ``bench.edge``) cannot show apart on a machine whose speed drifts.

Each stage runs ``--repeat`` times; it prints the best and the median µs per event.
``--baseline PATH`` measures another checkout's code too, alternating with this one for
``--rounds`` rounds (each in a subprocess with its checkout first on ``sys.path``, the
one to go first alternating too), and prints both side by side.

    python -m bench.stages --rounds 3 --baseline /tmp/main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson


def body(events: int, customers: int, now: datetime) -> bytes:
    """A batch as the middleware's emitter sends it (before gzip)."""
    batch = []
    for n in range(events):
        event: dict[str, Any] = {
            "specversion": "1.0",
            "source": "edge-app",
            "id": uuid.uuid4().hex,
            "type": "api_call",
            "subject": f"cust-{n % customers:03d}",
            "time": (now - timedelta(milliseconds=n)).isoformat(),
            "data": {"endpoint": "/v1/geocode", "method": "GET", "status": 200},
        }
        if n % 2:
            event["tallylease"] = "ls_" + "a" * 16
        batch.append(event)
    return orjson.dumps(batch)


def timed(run: Callable[[], Any], repeat: int, events: int) -> dict[str, float]:
    """Best and median µs per event over ``repeat`` runs."""
    took = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        took.append((time.perf_counter() - began) / events * 1e6)
    return {"best": round(min(took), 2), "median": round(statistics.median(took), 2)}


def measure(events: int, customers: int, repeat: int) -> dict[str, dict[str, float]]:
    """Every stage's cost per event, in this process's code."""
    from schemas import envelope
    from schemas.catalog import Catalog
    from services.aggregator import clickhouse_sink, increments
    from services.ingest import parsing, publisher

    now = datetime.now(UTC)
    raw = body(events, customers, now)
    bounds = parsing.TimeBounds(timedelta(minutes=5), timedelta(days=35))
    meters: dict[str, list[Any]] = {}
    for meter in Catalog.default().meters:
        meters.setdefault(meter.event_type, []).append(meter)
    items = parsing.items(raw, parsing.BATCH, events)
    verdicts = asyncio.run(parsing.judge(items, bounds, now))
    accepted = [v.event for v in verdicts if v.event is not None]
    records = publisher.envelope_records(accepted, now, tuple(range(8)), 1)
    shares = [share for r in records for share in envelope.decode_shares(r.value)]
    stored = [event for _, share in shares for event in share]

    def build() -> None:
        for customer, share in shares:
            increments.build(customer, share, meters, now, {}, None)

    stages: dict[str, Callable[[], Any]] = {
        "ingest: parse the body": lambda: parsing.items(raw, parsing.BATCH, events),
        "ingest: judge": lambda: asyncio.run(parsing.judge(items, bounds, now)),
        "ingest: encode envelopes": lambda: publisher.envelope_records(
            accepted, now, tuple(range(8)), 1
        ),
        "aggregator: decode envelopes": lambda: [envelope.decode_shares(r.value) for r in records],
        "aggregator: counter operations": build,
        "aggregator: ClickHouse rows": lambda: clickhouse_sink.encode(stored),
    }
    found = {name: timed(run, repeat, events) for name, run in stages.items()}
    found["sum"] = {
        "best": round(sum(f["best"] for f in found.values()), 2),
        "median": round(sum(f["median"] for f in found.values()), 2),
    }
    return found


def elsewhere(checkout: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``measure`` run on another checkout's code: this file, as a script, with that
    checkout first on the path (it need not hold this benchmark)."""
    command = [sys.executable, __file__, "--json", "--events", str(args.events)]
    command += ["--customers", str(args.customers), "--repeat", str(args.repeat)]
    env = os.environ | {"PYTHONPATH": checkout}
    done = subprocess.run(command, env=env, cwd=checkout, capture_output=True, check=True)
    result: dict[str, dict[str, float]] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=7, help="runs of each stage")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout to measure alongside")
    parser.add_argument("--json", action="store_true", help="one round, as JSON")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.events, args.customers, args.repeat)))
        return
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {"this": [], "baseline": []}
    for n in range(args.rounds):
        if not args.baseline:
            rounds["this"].append(measure(args.events, args.customers, args.repeat))
            continue
        # Both in a fresh process, and which goes first alternating round by round: this
        # machine's speed drifts, and the first of two back-to-back runs was seen ahead.
        here = str(Path(__file__).resolve().parents[1])
        checkouts = [("this", here), ("baseline", args.baseline)]
        for kind, checkout in checkouts if n % 2 == 0 else checkouts[::-1]:
            rounds[kind].append(elsewhere(checkout, args))
    summary = {
        kind: {
            stage: {
                "best_us_per_event": min(r[stage]["best"] for r in measured),
                "median_us_per_event": statistics.median(r[stage]["median"] for r in measured),
            }
            for stage in measured[0]
        }
        for kind, measured in rounds.items()
        if measured
    }
    print(json.dumps({"events": args.events, "rounds": args.rounds, **summary}, indent=2))


if __name__ == "__main__":
    main()
