"""End-to-end ingest benchmark: events/s accepted, events/s counted, 202→visible latency.

Two layouts, both on this one machine:
- ``up``: ``tally up``, all four services in one process on the embedded defaults;
- ``split`` (default): the production shape — a Kafka-protocol broker (Tansu), one
  ``tally ingest`` process and one ``tally aggregator`` process — so the two Python
  processes share the machine's cores the way separate containers would.

From this separate process it then posts pre-built batches over HTTP from several
concurrent senders for a fixed duration.  Each request carries one "probe" event of a customer
owned by its sender, so the time from the 202 to the request being visible in Redis is
measured per request: the probe customer's day counter reaching the request's number.
It runs on its own stores (``bench.stores``), never on ``DATABASE_URL`` / ``REDIS_URL``.

    python -m bench.pipeline --seconds 20 --customers 50 --batch 2000 --senders 4 --layout split
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from bench.stores import bench_stores
from schemas import redis_keys
from schemas.events import utcnow
from schemas.windows import Window, bucket_id
from services.common.broker import EmbeddedBroker
from tests.support import TALLY, TallyProcess

TOKEN = "bench-token"


def build_requests(args: argparse.Namespace, sender: int, count: int) -> list[bytes]:
    """Pre-encoded bodies, so the client spends its CPU on sending, not on JSON."""
    now = utcnow()
    probe = f"{args.tag}-probe-{sender}"
    bodies = []
    for n in range(count):
        events: list[dict[str, Any]] = [
            {
                "specversion": "1.0",
                "id": uuid.uuid4().hex,
                "source": f"bench/{sender}",
                "type": "api_call",
                "subject": probe if i == 0 else f"{args.tag}-c{(n * 7 + i) % args.customers:03d}",
                "time": (now - timedelta(milliseconds=i)).isoformat(),
                "data": {"endpoint": f"/v1/e{i % 5}", "method": "GET", "status": 200},
            }
            for i in range(args.batch)
        ]
        bodies.append(orjson.dumps(events))
    return bodies


async def sender(
    client: httpx.AsyncClient,
    bodies: list[bytes],
    deadline: float,
    interval: float,
    sent: list[tuple[float, int]],
    refused: list[int],
    late: list[float] | None = None,
    phase: float = 0.0,
) -> int:
    """Post bodies back to back, or one per ``interval`` seconds when pacing (starting
    ``phase`` seconds in, so paced senders spread their requests evenly); a 503
    (ingest's backpressure) is retried after its ``Retry-After``, as a client should.

    A sender waits for a request's answer before it starts its next one: its requests
    reach the probe's partition in order, which is what makes "the probe's count reached
    n" mean "request n is visible".  Paced, it notes in ``late`` how far behind its
    schedule each request started: near zero when the offered rate held."""
    accepted = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    next_at = time.monotonic() + phase
    for number, body in enumerate(bodies, start=1):
        if time.monotonic() >= deadline:
            break
        if interval:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if late is not None:
                late.append(time.monotonic() - next_at)
            next_at += interval
        response = await client.post("/v1/events", content=body, headers=headers)
        while response.status_code == 503 and time.monotonic() < deadline:
            refused.append(1)
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            response = await client.post("/v1/events", content=body, headers=headers)
        if response.status_code == 503:
            break
        response.raise_for_status()
        sent.append((time.monotonic(), number))
        accepted += int(response.json()["accepted"])
    return accepted


async def watch(
    redis_url: str,
    tag: str,
    senders: int,
    sent: list[list[tuple[float, int]]],
    stop: asyncio.Event,
) -> list[float]:
    """Poll the probe counters; the latency of request i is when count(probe) reached i."""
    client = aioredis.Redis.from_url(redis_url)
    day = bucket_id(Window.DAY, utcnow())
    keys = [
        redis_keys.counters(f"{tag}-probe-{s}", "api_calls", Window.DAY, day)
        for s in range(senders)
    ]
    seen = [0] * senders
    latencies: list[float] = []
    while True:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, redis_keys.TOTAL)
            values = await pipe.execute()
        now = time.monotonic()
        for s, raw in enumerate(values):
            count = int(raw or 0) // 1_000_000
            for at, number in sent[s][seen[s] : count]:
                latencies.append(now - at)
                seen[s] = number
        if stop.is_set() and all(seen[s] >= len(sent[s]) for s in range(senders)):
            break
        await asyncio.sleep(0.005)
    await client.aclose()
    return latencies


async def counted(redis_url: str, tag: str, customers: int, senders: int) -> int:
    client = aioredis.Redis.from_url(redis_url)
    day = bucket_id(Window.DAY, utcnow())
    names = [f"{tag}-c{i:03d}" for i in range(customers)] + [
        f"{tag}-probe-{s}" for s in range(senders)
    ]
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hget(redis_keys.counters(name, "api_calls", Window.DAY, day), redis_keys.TOTAL)
        values = await pipe.execute()
    await client.aclose()
    return sum(int(v or 0) for v in values) // 1_000_000


async def drive(args: argparse.Namespace, url: str, redis_url: str) -> dict[str, Any]:
    target = args.rate or args.target
    per_sender = int(args.seconds * target / args.batch / args.senders) + 2
    interval = args.batch * args.senders / args.rate if args.rate else 0.0
    bodies = [build_requests(args, s, per_sender) for s in range(args.senders)]
    sent: list[list[tuple[float, int]]] = [[] for _ in range(args.senders)]
    stop = asyncio.Event()
    refused: list[int] = []
    late: list[float] = []
    limits = httpx.Limits(max_connections=args.senders, max_keepalive_connections=args.senders)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        watcher = asyncio.create_task(watch(redis_url, args.tag, args.senders, sent, stop))
        start = time.monotonic()
        deadline = start + args.seconds
        accepted = sum(
            await asyncio.gather(
                *(
                    sender(
                        client,
                        bodies[s],
                        deadline,
                        interval,
                        sent[s],
                        refused,
                        late,
                        phase=interval * s / args.senders,
                    )
                    for s in range(args.senders)
                )
            )
        )
        sending = time.monotonic() - start
        stop.set()
        latencies = await asyncio.wait_for(watcher, timeout=300)
        total = await counted(redis_url, args.tag, args.customers, args.senders)
        while total < accepted and time.monotonic() - start < args.seconds + 300:
            await asyncio.sleep(0.05)
            total = await counted(redis_url, args.tag, args.customers, args.senders)
        drained = time.monotonic() - start
    latencies.sort()
    late.sort()
    return {
        "layout": args.layout,
        "offered_per_s": args.rate or "flat out",
        "duration_s": round(sending, 2),
        "customers": args.customers,
        "batch": args.batch,
        "senders": args.senders,
        "events_accepted": accepted,
        "accepted_per_s": round(accepted / sending),
        "events_counted": total,
        "counted_per_s": round(total / drained),
        "drained_after_s": round(drained, 2),
        "visible_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "visible_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "visible_max_ms": round(latencies[-1] * 1000, 1),
        "started_late_p99_ms": round(late[int(len(late) * 0.99) - 1] * 1000, 1) if late else 0,
        "requests": len(latencies),
        "refused_503": len(refused),
    }


def start_services(
    args: argparse.Namespace, env: dict[str, str], data_dir: Path, stack: ExitStack
) -> TallyProcess:
    """The services under test, ready, each stopped by ``stack`` (the last started
    first); returns the one serving ingest."""

    def start(command: list[str], env: dict[str, str]) -> TallyProcess:
        service = TallyProcess(command, env, data_dir / f"{command[0]}.log")
        stack.callback(service.stop)  # also when it does not get ready
        return service.start()

    if args.layout == "up":
        return start(["up"], env)
    broker = EmbeddedBroker(log_path=data_dir / "tansu.log")
    stack.callback(broker.stop)
    broker.start()
    env = env | {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    subprocess.run([*TALLY, "migrate"], env=os.environ | env, check=True, capture_output=True)
    start(["aggregator"], env)
    return start(["ingest"], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=["split", "up"], default="split")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2000, help="events per request")
    parser.add_argument("--senders", type=int, default=4, help="concurrent HTTP senders")
    parser.add_argument("--rate", type=int, default=0, help="events/s to offer (0: flat out)")
    parser.add_argument("--target", type=int, default=60_000, help="events/s to pre-build for")
    args = parser.parse_args()
    args.tag = "bench"

    with bench_stores("tally-bench-pipeline-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_LOG_LEVEL": "WARNING",
            "TALLY_KAFKA_SESSION_TIMEOUT": "6",
        }
        with ExitStack() as stack:
            ingest = start_services(args, env, stores.data_dir, stack)
            result = asyncio.run(drive(args, ingest.url, stores.redis_url))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
