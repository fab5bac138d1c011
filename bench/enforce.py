"""Enforcement benchmark: decisions/s and latency over HTTP, against a bare endpoint.

Starts ``tally api`` and, with the same uvicorn settings, ``bench.bare_app`` (a FastAPI
endpoint that validates the same body and decides nothing).  Signs up customers on a
plan with generous limits (so every decision runs the whole script and is allowed),
then from this process:

1. flat out (closed loop, ``--connections`` keep-alive connections), ``--rounds``
   times: bare, ``/v1/enforce`` in check mode, in reserve mode — decisions/s and the
   ratio to bare within each round;
2. a fixed offered rate (``--rate``, open loop): p50/p99 latency, bare and enforce;
3. through the SDK (``tally_sdk.Tally.check``, httpx underneath): decisions/s.

Each request carries a customer's API key and an end user's address in
X-Forwarded-For, as the middleware sends them, so the per-address layer runs too.

    python -m bench.enforce --seconds 10 --rounds 3 --rate 2000 --customers 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis as sync_redis
from tally_sdk import Tally

from bench.http_load import Result, closed_loop, collector_paused, open_loop, request
from services.common.broker import free_port
from tests.support import TALLY, TallyProcess, wait_for

TOKEN = "bench-token"
ADMIN = "bench-admin"
PLAN = {
    "id": "bench",
    "name": "Benchmark",
    "rate_limits": [{"name": "bench-per-second", "limit": 100_000, "per": "second"}],
    "quotas": {"api_calls": {"limit": 1_000_000_000, "enforcement": "soft"}},
}


def sign_up(url: str, customers: int) -> list[tuple[str, str]]:
    """(customer, key) pairs on the benchmark plan."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, headers=admin, timeout=30) as client:
        client.put(f"/v1/admin/plans/{PLAN['id']}", json=PLAN).raise_for_status()
        accounts = []
        for _ in range(customers):
            body = {"email": f"{uuid.uuid4().hex[:12]}@bench.example", "plan": PLAN["id"]}
            reply = client.post("/v1/admin/customers", json=body)
            reply.raise_for_status()
            found = reply.json()
            accounts.append((found["customer"]["id"], found["api_key"]["key"]))
    return accounts


def requests_for(port: int, accounts: list[tuple[str, str]], mode: str, count: int) -> list[bytes]:
    built = []
    for n in range(count):
        _, key = accounts[n % len(accounts)]
        body: dict[str, Any] = {"endpoint": "/v1/geocode", "mode": mode}
        if mode == "reserve":
            body["event"] = {"source": "bench", "id": uuid.uuid4().hex}
        headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": f"203.0.113.{n % 250}"}
        built.append(request("127.0.0.1", port, "/v1/enforce", orjson.dumps(body), headers))
    return built


async def through_sdk(url: str, accounts: list[tuple[str, str]], seconds: float) -> Result:
    """16 concurrent callers of ``Tally.check``; also what each decision cost this
    process in CPU (httpx's share: the client is the limit here)."""
    result = Result(seconds)
    deadline = time.perf_counter() + seconds
    async with Tally(url, TOKEN, source="bench") as tally:

        async def caller(n: int) -> None:
            while (started := time.perf_counter()) < deadline:
                decision = await tally.check(key=accounts[n % len(accounts)][1], endpoint="/x")
                result.latencies.append(time.perf_counter() - started)
                status = 200 if decision.allowed else 429
                result.statuses[status] = result.statuses.get(status, 0) + 1

        with collector_paused():
            cpu, begin = time.process_time(), time.perf_counter()
            await asyncio.gather(*(caller(n) for n in range(16)))
            result.seconds = time.perf_counter() - begin
            result.client_cpu_s = time.process_time() - cpu
    return result


async def measure(
    args: argparse.Namespace, api_port: int, bare_port: int, api_url: str
) -> dict[str, Any]:
    accounts = sign_up(api_url, args.customers)
    total = int(args.seconds * 6_000 * args.rounds)
    check = requests_for(api_port, accounts, "check", 5_000)
    reserve = requests_for(api_port, accounts, "reserve", total)
    bare = requests_for(bare_port, accounts, "check", 5_000)
    host, conns = "127.0.0.1", args.connections
    await closed_loop(host, bare_port, bare, conns, 2)  # warm up both servers
    await closed_loop(host, api_port, check, conns, 2)
    # This VM's speed drifts by tens of percent over a minute: interleave the three
    # kinds round by round, compare within rounds, report medians.
    rounds: list[dict[str, Result]] = []
    for _ in range(args.rounds):
        rounds.append(
            {
                "bare": await closed_loop(host, bare_port, bare, conns, args.seconds),
                "enforce_check": await closed_loop(host, api_port, check, conns, args.seconds),
                "enforce_reserve": await closed_loop(host, api_port, reserve, conns, args.seconds),
            }
        )
    fixed = {
        "bare": await open_loop(host, bare_port, bare, args.rate, args.seconds, 64),
        "enforce_check": await open_loop(host, api_port, check, args.rate, args.seconds, 64),
    }
    sdk = await through_sdk(api_url, accounts, args.seconds)

    def ratios(kind: str) -> list[float]:
        return [round(r[kind].per_second / r["bare"].per_second, 3) for r in rounds]

    return {
        "customers": args.customers,
        "connections": conns,
        "flat_out_rounds": [{k: round(v.per_second) for k, v in r.items()} for r in rounds],
        "flat_out_median_per_s": {
            kind: round(statistics.median(r[kind].per_second for r in rounds)) for kind in rounds[0]
        },
        "check_vs_bare_per_round": ratios("enforce_check"),
        "check_vs_bare_median": statistics.median(ratios("enforce_check")),
        "reserve_vs_bare_median": statistics.median(ratios("enforce_reserve")),
        "flat_out_enforce_check_latency": rounds[-1]["enforce_check"].summary(),
        f"offered_{args.rate}_per_s": {name: r.summary() for name, r in fixed.items()},
        "sdk_check_16_concurrent": sdk.summary(),
    }


def start_bare(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_app", "--port", str(port)], stdout=out, stderr=out
        )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, "bare app ready")
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved flat-out rounds")
    parser.add_argument("--rate", type=int, default=2000, help="offered decisions/s (open loop)")
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="tally-bench-enforce-"))
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
    env = {
        "TALLY_DATA_DIR": str(data_dir),
        "REDIS_URL": redis_url,
        "DATABASE_URL": os.environ.get(
            "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/tally_bench"
        ),
        "TALLY_SERVICE_TOKENS": TOKEN,
        "TALLY_ADMIN_TOKEN": ADMIN,
        "TALLY_LOG_LEVEL": "WARNING",
    }
    sync_redis.Redis.from_url(redis_url).flushdb()
    subprocess.run([*TALLY, "migrate"], env=os.environ | env, check=True, capture_output=True)
    api = TallyProcess(["api"], env, data_dir / "api.log").start()
    bare_port = free_port()
    bare = start_bare(bare_port, data_dir / "bare.log")
    try:
        result = asyncio.run(measure(args, api.port, bare_port, api.url))
    finally:
        bare.terminate()
        bare.wait(10)
        api.stop()
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
