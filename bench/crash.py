"""Crash benchmark: ``tally up`` under load, killed with SIGKILL at random moments.

Each run starts ``tally up`` on the same data directory (timing process start →
``/readyz`` 200), has the client retry the requests that were in flight at the last kill
(they got no answer, so a client sends them again), checks that the usage API counts
exactly the events acknowledged so far, then offers ``--rate`` events/s from
``--senders`` concurrent clients for a random 2-6 s and kills ``tally up`` with SIGKILL
(its embedded broker dies with it).  After ``--runs`` kills a last start is checked the
same way, stopped gracefully, and ClickHouse (chDB) is read for the stored ids: lost =
acknowledged and not there, doubled = there more than once after ``FINAL``.

    python -m bench.crash --runs 5 --rate 2000
    python -m bench.crash --runs 3 --wal off     # what the write-ahead log prevents
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.pipeline import TOKEN
from bench.stores import bench_stores
from schemas.events import UsageEvent, utcnow
from services.common import clickhouse
from services.common.settings import Settings
from services.ingest.publisher import envelope_records
from services.ingest.wal.journal import Journal
from tests.support import TallyProcess, wait_for

HEADERS = {"Authorization": f"Bearer {TOKEN}"}
REPLAYED = re.compile(r"write-ahead log replayed.*?records=(\d+) seconds=([\d.]+)")


@dataclass
class Ledger:
    """What the client knows: events acknowledged (202), requests left unanswered."""

    customers: int
    acknowledged: set[str] = field(default_factory=set)
    unanswered: list[list[dict[str, Any]]] = field(default_factory=list)

    def batch(self, size: int) -> list[dict[str, Any]]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return [
            {
                "specversion": "1.0",
                "id": uuid.uuid4().hex,
                "source": "bench/crash",
                "type": "api_call",
                "subject": f"crash-c{random.randrange(self.customers):02d}",
                "time": now,
                "data": {"endpoint": "/v1/x"},
            }
            for _ in range(size)
        ]


async def send(
    client: httpx.AsyncClient, ledger: Ledger, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    interval = args.batch * args.senders / args.rate
    next_at = time.monotonic()
    while not stop.is_set():
        batch = ledger.batch(args.batch)
        try:
            reply = await client.post("/v1/events", json=batch, headers=HEADERS)
        except httpx.HTTPError:
            ledger.unanswered.append(batch)
            return
        if reply.status_code == 202:
            ledger.acknowledged.update(e["id"] for e in batch)
        else:
            ledger.unanswered.append(batch)  # a 503: nothing accepted, retried later
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def load_then_kill(
    up: TallyProcess, ledger: Ledger, args: argparse.Namespace, seconds: float | None = None
) -> float:
    """Offer the load for ``seconds`` (default: a random 2-6), then SIGKILL ``tally up``
    mid-stream."""
    stop = asyncio.Event()
    seconds = random.uniform(2, 6) if seconds is None else seconds
    async with httpx.AsyncClient(base_url=up.url, timeout=30) as client:
        senders = [
            asyncio.create_task(send(client, ledger, args, stop)) for _ in range(args.senders)
        ]
        await asyncio.sleep(seconds)
        assert up.process is not None
        up.process.send_signal(signal.SIGKILL)
        stop.set()
        await asyncio.gather(*senders)
    up.process.wait(10)
    return seconds


def retry_unanswered(up: TallyProcess, ledger: Ledger) -> None:
    batches, ledger.unanswered = ledger.unanswered, []
    for batch in batches:
        reply = httpx.post(f"{up.url}/v1/events", json=batch, headers=HEADERS, timeout=30)
        reply.raise_for_status()
        ledger.acknowledged.update(e["id"] for e in batch)


def counted(up: TallyProcess, customers: int) -> int:
    total = Decimal(0)
    for n in range(customers):
        reply = httpx.get(
            f"{up.url}/v1/customers/crash-c{n:02d}/usage",
            params={"meter": "api_calls", "window": "month"},
            headers=HEADERS,
            timeout=10,
        )
        reply.raise_for_status()
        total += sum((Decimal(p["value"]) for p in reply.json()["data"]), Decimal(0))
    return int(total)


def settle(up: TallyProcess, ledger: Ledger, wait: float) -> int:
    """The usage API's count once it has stopped moving (or reached the target)."""
    target = len(ledger.acknowledged)
    with contextlib.suppress(AssertionError):  # lost events: reported, not raised
        wait_for(lambda: counted(up, ledger.customers) >= target, wait, "all counted")
    time.sleep(2)  # late repeats from the replay would show here
    return counted(up, ledger.customers)


def start(env: dict[str, str], log: Path) -> tuple[TallyProcess, float, tuple[int, float]]:
    """A started ``tally up``, seconds to ready, and what its log says it replayed:
    (records, seconds)."""
    began = time.monotonic()
    up = TallyProcess(["up"], env, log).start()
    ready = time.monotonic() - began
    found = REPLAYED.findall(log.read_text(errors="replace"))
    return up, ready, (sum(int(n) for n, _ in found), sum(float(s) for _, s in found))


def stored(data_dir: Path) -> tuple[int, set[str]]:
    """Rows after FINAL and the distinct ids ClickHouse (chDB) holds for the bench."""
    store = clickhouse.connect(Settings(data_dir=data_dir))
    try:
        rows = store.query(
            f"SELECT id, count() FROM {store.database}.events FINAL"
            " WHERE source = 'bench/crash' GROUP BY id"
        )
    finally:
        store.close()
    return sum(int(c) for _, c in rows), {str(i) for i, _ in rows}


def seed_backlog(ledger: Ledger, args: argparse.Namespace, wal: Path) -> None:
    """``--backlog`` events acknowledged and never counted, as a crash leaves them: in
    the log as ingest writes it (one envelope per partition per request), for the first
    start to replay."""

    async def write() -> None:
        journal = Journal.open(wal, 4 * 2**20, 2.0).journal
        received_at = utcnow()
        partitions = tuple(range(Settings.model_fields["events_partitions"].default))
        for _ in range(args.backlog // args.batch):
            batch = ledger.batch(args.batch)
            events = [UsageEvent.model_validate(raw) for raw in batch]
            records = envelope_records(events, received_at, partitions)
            ticket = journal.append(records)
            await ticket.wait()
            journal.release(ticket, None)
            ledger.acknowledged.update(e["id"] for e in batch)
        await journal.close()

    asyncio.run(write())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="kill -9s")
    parser.add_argument("--rate", type=int, default=2000, help="events/s offered")
    parser.add_argument("--batch", type=int, default=50, help="events per request")
    parser.add_argument("--senders", type=int, default=2, help="concurrent clients")
    parser.add_argument("--customers", type=int, default=20)
    parser.add_argument("--wal", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--backlog", type=int, default=0, help="events left in the log before the first start"
    )
    args = parser.parse_args()
    random.seed(args.seed)

    ledger = Ledger(args.customers)
    runs: list[dict[str, Any]] = []
    with bench_stores("tally-bench-crash-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_LOG_LEVEL": "INFO",
            "TALLY_INGEST_WAL": args.wal,
        }
        if args.backlog:
            seed_backlog(ledger, args, stores.data_dir / "wal")
        first: dict[str, Any] = {}
        for run in range(args.runs + 1):
            log = stores.data_dir / f"up-{run}.log"
            up, ready, replayed = start(env, log)
            retry_unanswered(up, ledger)
            total = settle(up, ledger, 60)
            acknowledged = len(ledger.acknowledged)
            if not first:
                first = {
                    "first_start_s": round(ready, 2),
                    "backlog_events": args.backlog,
                    "replayed_records": replayed[0],
                    "replay_s": replayed[1],
                    "counted_after_start": total,
                    "lost": max(0, len(ledger.acknowledged) - total),
                }
            elif runs:
                runs[-1] |= {
                    "counted_after_restart": total,
                    "lost": max(0, acknowledged - total),
                    "doubled": max(0, total - acknowledged),
                    "restart_s": round(ready, 2),
                    "replayed_records": replayed[0],
                    "replay_s": replayed[1],
                }
            if run == args.runs:
                up.stop()
                break
            loaded = asyncio.run(load_then_kill(up, ledger, args))
            runs.append(
                {
                    "run": run + 1,
                    "killed_after_s": round(loaded, 2),
                    "acknowledged_total": len(ledger.acknowledged),
                    "unanswered_requests": len(ledger.unanswered),
                }
            )
        rows, ids = stored(stores.data_dir)
    restarts = [r["restart_s"] for r in runs]
    result = {
        "wal": args.wal,
        "offered_per_s": args.rate,
        "first_start": first,
        "runs": runs,
        "acknowledged": len(ledger.acknowledged),
        "usage_api_counted": total,
        "clickhouse_rows_final": rows,
        "clickhouse_lost": len(ledger.acknowledged - ids),
        "clickhouse_doubled": rows - len(ids),
        "restart_s_median": round(statistics.median(restarts), 2),
        "restart_s_min_max": [min(restarts), max(restarts)],
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
