"""Alerts benchmark: event 202 → signed webhook received, at 1,000 events/s, and how
many webhooks the notifier delivers per second flat out.

Starts ``tally up`` (all four services in one process, embedded Tansu and chDB) on the
benchmark's own stores (``bench.stores``), and in this process a webhook receiver
(aiohttp on 127.0.0.1).  Puts a plan with a quota of 10 ``api_calls`` and the default
alerts (80, 90, 100 %: 8, 9 and 10 calls), creates ``--customers`` customers on it and
one webhook endpoint per customer (``/c/<customer>`` on the receiver): each customer's
own endpoint, as the product gives them, so the sender's per-endpoint cap (4 in flight)
is what isolation costs and not a single shared endpoint's queue.  The alert levels are
compiled once (``AlertCompiler.everyone``, as billing does at start).

1. **Latency.** Offers ``--rate`` events/s (open loop: one request of the due events
   every 10 ms) spread over the customers in rounds: round n carries every customer's
   nth call, so the rate holds throughout and a customer's calls are a round
   (customers / rate, 1 s) apart: its 8th, 9th and 10th calls land in different
   aggregator batches (each fires its own alert) while the crossings come in the last
   three rounds, at the offered rate.  For each webhook: latency = receive time - the
   time the 202 came back for the request that carried the crossing event (the
   customer's nth accepted event for the threshold at n calls).  p50/p99/max, split at
   the stream (202 -> published: the pipeline and the aggregator's Lua; published ->
   received: the notifier), the count (expected 3 x customers), ``missing`` (when the
   aggregator lags and takes two of a customer's crossings in one batch, only the
   higher fires: ``published`` says how many it fired), and the duplicated (a
   ``webhook-id`` seen twice); each signature verified with ``standardwebhooks``.
2. **Deliveries/s.** ``--burst`` notifications published onto the stream at once
   (``services.common.notify.publish``, spread over the customers): count ÷ time from
   the first publish to the last webhook received.

    python -m bench.alerts [--customers 1000] [--rate 1000] [--burst 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from aiohttp import web
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from standardwebhooks import Webhook

from bench.enforce import ADMIN, TOKEN, dumps
from bench.stores import Stores, bench_stores
from schemas import redis_keys
from schemas.notifications import STREAM, Notification, NotificationType, notification_id
from services.billing.notification.alerts.compile import AlertCompiler
from services.common.notify import publish
from tests.support import TallyProcess

PLAN = {
    "id": "bench-alerts",
    "name": "Alerts benchmark",
    "rate_limits": [{"name": "bench-per-second", "limit": 100_000, "per": "second"}],
    "quotas": {"api_calls": {"limit": 10, "enforcement": "soft"}},
    "alerts": {"percent": [80, 90, 100]},
}
EVENTS = 10  # per customer: crossing 8, 9 and 10
CROSSINGS = {8: "80", 9: "90", 10: "100"}  # the nth call → the threshold it crosses
TICK = 0.01  # one request every 10 ms
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time()


@dataclass
class Receiver:
    """Every webhook, as received; the test of the run waits on ``arrived``."""

    base: str = ""
    got: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append(Received(request.path, dict(request.headers), body, time.time()))
        self.arrived.set()
        return web.Response(text="ok")

    async def until(self, count: int, idle: float) -> None:
        """Until ``count`` webhooks, or nothing new for ``idle`` seconds."""
        while len(self.got) < count:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), idle)
            except TimeoutError:
                return


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", found.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.base = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()


async def set_up(url: str, customers: int, rx: Receiver) -> dict[str, str]:
    """The plan, its customers and one endpoint each: customer → endpoint secret."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        reply = await client.put(f"/v1/admin/plans/{PLAN['id']}", json=PLAN, headers=admin)
        reply.raise_for_status()

        async def one() -> tuple[str, str]:
            async with gate:
                body = {"email": f"{uuid.uuid4().hex[:12]}@bench.example", "plan": PLAN["id"]}
                made = await client.post("/v1/admin/customers", json=body, headers=admin)
                made.raise_for_status()
                customer: str = made.json()["customer"]["id"]
                hook = await client.post(
                    f"/v1/customers/{customer}/webhook-endpoints",
                    json={"url": rx.base + f"/c/{customer}", "events": ["alert.triggered"]},
                    headers=HEADERS,
                )
                hook.raise_for_status()
                return customer, hook.json()["secret"]

        return dict(await asyncio.gather(*(one() for _ in range(customers))))


async def compile_alerts(stores: Stores, customers: list[str]) -> None:
    """Every customer's alert levels in Redis, before the first event."""
    redis = Redis.from_url(stores.redis_url)
    async with AsyncConnectionPool(stores.database_url, open=False) as pool:
        await AlertCompiler(pool, redis).everyone()
        for customer in customers:
            assert await redis.hlen(redis_keys.alerts(customer)), f"{customer}: no alert levels"
    await redis.aclose()


def schedule(customers: list[str], rate: float) -> list[list[tuple[str, int]]]:
    """Per 10 ms tick, the (customer, nth call) pairs due: round n sends every
    customer's nth call, customer i at i / rate into the round, so the offered rate is
    ``rate`` throughout and one customer's calls are a round (customers / rate) apart."""
    ticks: dict[int, list[tuple[str, int]]] = {}
    for n in range(1, EVENTS + 1):
        for i, customer in enumerate(customers):
            due = ((n - 1) * len(customers) + i) / rate
            ticks.setdefault(round(due / TICK), []).append((customer, n))
    return [ticks.get(t, []) for t in range(max(ticks) + 1)]


async def offer(
    url: str, plan: list[list[tuple[str, int]]]
) -> tuple[dict[tuple[str, str], float], Counter[str], float]:
    """Send each tick's events at its time; (customer, threshold) → when the customer's
    nth event was accepted (the nth 202 of its requests: a threshold of n calls cannot
    be crossed before then, whatever order an overloaded server took them in), the
    statuses, and how late the last request started (the client keeping up)."""
    accepted: dict[tuple[str, str], float] = {}
    times: defaultdict[str, list[float]] = defaultdict(list)  # a customer's 202s
    statuses: Counter[str] = Counter()
    lag = 0.0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, limits=limits) as client:

        async def post(due: list[tuple[str, int]]) -> None:
            now = datetime.now(UTC).isoformat()
            events = [
                {
                    "specversion": "1.0",
                    "id": f"{customer}-{n}",
                    "source": "bench-alerts",
                    "type": "api_call",
                    "subject": customer,
                    "time": now,
                    "data": {"value": 1},
                }
                for customer, n in due
            ]
            try:
                reply = await client.post("/v1/events", content=orjson.dumps(events), timeout=30)
            except httpx.HTTPError as exc:  # counted, not fatal: its crossings are not expected
                statuses[type(exc).__name__] += 1
                return
            at = time.time()
            statuses[str(reply.status_code)] += 1
            if reply.status_code != 202:
                return
            for customer, _ in due:
                times[customer].append(at)

        started = time.perf_counter()
        tasks = []
        for i, due in enumerate(plan):
            wait = started + i * TICK - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                lag = max(lag, -wait)
            if due:
                tasks.append(asyncio.create_task(post(due)))
        await asyncio.gather(*tasks)
    for customer, accepted_at in times.items():
        ordered = sorted(accepted_at)
        for n, threshold in CROSSINGS.items():
            if len(ordered) >= n:
                accepted[(customer, threshold)] = ordered[n - 1]
    return accepted, statuses, lag


def latencies(
    rx: Receiver, secrets: dict[str, str], accepted: dict[tuple[str, str], float]
) -> dict[str, Any]:
    """Receive - 202 per expected alert; the missing, the duplicated, the forged."""
    seen: Counter[str] = Counter()
    first: dict[tuple[str, str], float] = {}
    decided: dict[tuple[str, str], float] = {}  # the alert's occurred_at: the aggregator's
    forged = 0
    for got in rx.got:
        customer = got.path.removeprefix("/c/")
        seen[got.headers["webhook-id"]] += 1
        try:
            body = Webhook(secrets[customer]).verify(got.body, got.headers)
        except Exception:
            forged += 1
            continue
        key = (customer, body["data"]["threshold"]["value"])
        if key not in first:
            first[key] = got.at
            decided[key] = datetime.fromisoformat(body["timestamp"]).timestamp()
    ms = sorted((first[k] - accepted[k]) * 1000 for k in first if k in accepted)
    stages = {
        "202_to_published": percentiles(
            [(decided[k] - accepted[k]) * 1000 for k in first if k in accepted]
        ),
        "published_to_received": percentiles([(first[k] - decided[k]) * 1000 for k in first]),
    }
    return {
        "expected": len(accepted),
        "received": len(rx.got),
        "missing": len(set(accepted) - set(first)),
        "missing_by_threshold": dict(Counter(t for _, t in set(accepted) - set(first))),
        "duplicates": sum(c - 1 for c in seen.values()),
        "bad_signatures": forged,
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1) if ms else None,
        "max_ms": round(ms[-1], 1) if ms else None,
        "min_ms": round(ms[0], 1) if ms else None,
        **stages,
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    ms = sorted(values)
    if not ms:
        return {"p50_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1),
    }


async def published(stores: Stores) -> int:
    """How many alerts the aggregator put on the stream (the notifier's input)."""
    redis = Redis.from_url(stores.redis_url)
    count = await redis.xlen(STREAM)
    await redis.aclose()
    return int(count)


async def burst(stores: Stores, rx: Receiver, customers: list[str], count: int) -> dict[str, Any]:
    """``count`` notifications published at once; delivered per second, flat out."""
    before = len(rx.got)
    tag = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    notes = [
        Notification(
            id=notification_id(NotificationType.ALERT_TRIGGERED, c, "burst", tag, n),
            type=NotificationType.ALERT_TRIGGERED,
            customer=c,
            occurred_at=now,
            data={"customer": c, "meter": "api_calls", "burst": n},
        )
        for n in range(count)
        for c in [customers[n % len(customers)]]
    ]
    redis = Redis.from_url(stores.redis_url)
    started = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        for note in notes:
            await publish(pipe, note)
        await pipe.execute()
    published = time.time() - started
    await rx.until(before + count, idle=15)
    await redis.aclose()
    got = rx.got[before:]
    took = (max(g.at for g in got) - started) if got else float("nan")
    return {
        "notifications": count,
        "delivered": len(got),
        "publish_s": round(published, 2),
        "seconds": round(took, 2),
        "deliveries_per_s": round(len(got) / took) if got else 0,
    }


async def run(args: argparse.Namespace, stores: Stores, url: str) -> dict[str, Any]:
    async with receiver() as rx:
        began = time.perf_counter()
        secrets = await set_up(url, args.customers, rx)
        customers = list(secrets)
        await compile_alerts(stores, customers)
        setup_s = time.perf_counter() - began
        plan = schedule(customers, args.rate)
        accepted, statuses, lag = await offer(url, plan)
        await rx.until(len(accepted), idle=args.idle)
        result = latencies(rx, secrets, accepted)
        result["published"] = await published(stores)
        delivered = await burst(stores, rx, customers, args.burst)
    events = args.customers * EVENTS
    return {
        "customers": args.customers,
        "events": events,
        "offered_events_per_s": args.rate,
        "seconds_offered": round(len(plan) * TICK, 1),
        "requests": dict(statuses),
        "client_lag_ms": round(lag * 1000, 1),
        "setup_s": round(setup_s, 1),
        "event_202_to_webhook": result,
        "burst": delivered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000, help="events/s offered")
    parser.add_argument("--burst", type=int, default=3000, help="notifications, flat out")
    parser.add_argument(
        "--concurrency", type=int, help="TALLY_WEBHOOK_CONCURRENCY (default: Tally's, 64)"
    )
    parser.add_argument("--idle", type=float, default=10, help="s without a webhook: done")
    args = parser.parse_args()
    with bench_stores("tally-bench-alerts-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_ADMIN_TOKEN": ADMIN,
            "TALLY_LOG_LEVEL": "WARNING",
            "TALLY_IP_LIMIT_PER_SECOND": "0",  # every request here comes from 127.0.0.1
        }
        if args.concurrency:
            env["TALLY_WEBHOOK_CONCURRENCY"] = str(args.concurrency)
        tally = TallyProcess(["up"], env, stores.data_dir / "up.log").start()
        try:
            result = asyncio.run(run(args, stores, tally.url))
        finally:
            tally.stop()
    print(dumps(result))


if __name__ == "__main__":
    main()
