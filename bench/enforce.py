"""Enforcement benchmark: decisions/s and latency over HTTP, against two bare endpoints.

Starts ``tally api`` and, with the same uvicorn settings, two baselines from
``bench.bare_app`` that validate the same body and decide nothing: a FastAPI endpoint,
and a hot path answered ahead of FastAPI the way ``/v1/enforce`` is.  All of it runs on
the benchmark's own stores (``bench.stores``: a fresh PostgreSQL database, its own Redis
database, a temporary directory), never on ``DATABASE_URL`` / ``REDIS_URL``.  Signs up
customers on a plan with generous limits (so every decision runs the whole script and
is allowed), then from this process:

1. flat out (closed loop, ``--connections`` keep-alive connections), ``--rounds``
   times: the two baselines, ``/v1/enforce`` in check mode, in reserve mode —
   decisions/s, and each mode's ratio to either baseline within each round (then the
   median, min and max across rounds).  Every reservation names a new event: no round
   replays an earlier one's (which would be answered as already reserved);
2. a fixed offered rate (``--rate``, open loop): p50/p99 latency, baselines and enforce;
3. through the SDK (``tally_sdk.Tally.check``, httpx underneath): decisions/s.

Each request carries a customer's API key and an end user's address in
X-Forwarded-For, as the middleware sends them, so the per-address layer runs too.

    python -m bench.enforce --seconds 10 --rounds 3 --rate 2000 --customers 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from tally_sdk import Tally

from bench.bare_app import KINDS
from bench.http_load import Result, closed_loop, collector_paused, open_loop, request
from bench.stores import bench_stores
from services.common.broker import free_port
from tests.support import TallyProcess, wait_for

TOKEN = "bench-token"
ADMIN = "bench-admin"
PLAN = {
    "id": "bench",
    "name": "Benchmark",
    "rate_limits": [{"name": "bench-per-second", "limit": 100_000, "per": "second"}],
    "quotas": {"api_calls": {"limit": 1_000_000_000, "enforcement": "soft"}},
}
ADDRESSES = 250  # end users per run, in X-Forwarded-For
BARE = {"fastapi": "bare_fastapi", "hot-path": "bare_hot_path"}  # --kind: name in results
MODES = {"enforce_check": "check", "enforce_reserve": "reserve"}  # name in results: short


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


def _headers(accounts: list[tuple[str, str]], n: int) -> dict[str, str]:
    _, key = accounts[n % len(accounts)]
    return {"Authorization": f"Bearer {key}", "X-Forwarded-For": f"203.0.113.{n % ADDRESSES}"}


def checks(port: int, accounts: list[tuple[str, str]], count: int) -> list[bytes]:
    """Check-mode requests (they change nothing, so they may be sent again and again)."""
    body = orjson.dumps({"endpoint": "/v1/geocode", "mode": "check"})
    return [
        request("127.0.0.1", port, "/v1/enforce", body, _headers(accounts, n)) for n in range(count)
    ]


def reservations(port: int, accounts: list[tuple[str, str]], tag: str) -> Iterator[bytes]:
    """Reserve-mode requests without end, each naming a new event: ``<tag>-<n>``, n
    counting up.  Give each round its own ``tag`` and no reservation repeats, in a round
    or across rounds.  Each request is a pre-encoded template around the id (fixed
    width, so the Content-Length holds), which keeps the client's cost per request at
    two concatenations."""
    width = 12
    hole = "#" * (len(tag) + 1 + width)
    body = orjson.dumps(
        {"endpoint": "/v1/geocode", "mode": "reserve", "event": {"source": "bench", "id": hole}}
    )
    templates = []
    for n in range(math.lcm(len(accounts), ADDRESSES)):
        raw = request("127.0.0.1", port, "/v1/enforce", body, _headers(accounts, n))
        before, after = raw.split(hole.encode())
        templates.append((before, after))
    prefix = f"{tag}-".encode()
    for n in range(16**width):
        before, after = templates[n % len(templates)]
        yield before + prefix + b"%012x" % n + after


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


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def measure(
    args: argparse.Namespace, api_port: int, bare_ports: dict[str, int], api_url: str
) -> dict[str, Any]:
    accounts = sign_up(api_url, args.customers)
    check = checks(api_port, accounts, 5_000)
    bare = {name: checks(port, accounts, 5_000) for name, port in bare_ports.items()}
    host, conns = "127.0.0.1", args.connections
    warm_up = min(2.0, args.seconds)
    for name, port in bare_ports.items():
        await closed_loop(host, port, bare[name], conns, warm_up)
    await closed_loop(host, api_port, check, conns, warm_up)
    # This VM's speed drifts by tens of percent over a minute: interleave the kinds
    # round by round, compare within rounds, report medians and the spread.
    run = uuid.uuid4().hex[:8]
    rounds: list[dict[str, Result]] = []
    for number in range(args.rounds):
        measured = {
            name: await closed_loop(host, port, bare[name], conns, args.seconds)
            for name, port in bare_ports.items()
        }
        measured["enforce_check"] = await closed_loop(host, api_port, check, conns, args.seconds)
        fresh = reservations(api_port, accounts, f"{run}r{number}")
        measured["enforce_reserve"] = await closed_loop(host, api_port, fresh, conns, args.seconds)
        rounds.append(measured)
    fixed = {
        name: await open_loop(host, port, bare[name], args.rate, args.seconds, 64)
        for name, port in bare_ports.items()
    }
    fixed["enforce_check"] = await open_loop(host, api_port, check, args.rate, args.seconds, 64)
    sdk = await through_sdk(api_url, accounts, args.seconds)

    per_s = [{name: round(r.per_second) for name, r in measured.items()} for measured in rounds]
    ratios = [
        {
            f"{short}_vs_{baseline.removeprefix('bare_')}": round(
                measured[mode].per_second / measured[baseline].per_second, 3
            )
            for mode, short in MODES.items()
            for baseline in bare_ports
        }
        for measured in rounds
    ]
    return {
        "customers": args.customers,
        "connections": conns,
        "seconds_per_round": args.seconds,
        "flat_out_per_s_per_round": per_s,
        "flat_out_per_s_across_rounds": {
            name: {k: round(v) for k, v in spread([r[name] for r in per_s]).items()}
            for name in per_s[0]
        },
        "ratio_to_bare_per_round": ratios,
        "ratio_to_bare_across_rounds": {
            name: {k: round(v, 3) for k, v in spread([r[name] for r in ratios]).items()}
            for name in ratios[0]
        },
        "flat_out_answers_other_than_200": {
            name: {str(k): v for k, v in sorted(other.items())}
            for name in rounds[0]
            if (other := _others(r[name] for r in rounds))
        },
        "flat_out_enforce_check_latency": rounds[-1]["enforce_check"].summary(),
        f"offered_{args.rate}_per_s": {name: r.summary() for name, r in fixed.items()},
        "sdk_check_16_concurrent": sdk.summary(),
    }


def _others(results: Iterable[Result]) -> dict[int, int]:
    """Answers other than 200 in these results, by status (none, when all went well)."""
    counted: Counter[int] = Counter()
    for result in results:
        counted.update({k: v for k, v in result.statuses.items() if k != 200})
    return dict(counted)


def start_bare(kind: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_app", "--port", str(port), "--kind", kind],
            stdout=out,
            stderr=out,
        )

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"bare app ({kind}) exited:\n{log.read_text(errors='replace')}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, f"bare app ({kind}) ready")
    return process


def dumps(value: Any, indent: str = "") -> str:
    """JSON, indented, with what fits on one line on one line (a round's figures side
    by side)."""
    flat = json.dumps(value, ensure_ascii=False)
    if len(indent) + len(flat) <= 120 or not isinstance(value, dict | list):
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    return "[\n" + ",\n".join(inner + dumps(v, inner) for v in value) + f"\n{indent}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved flat-out rounds")
    parser.add_argument("--rate", type=int, default=2000, help="offered decisions/s (open loop)")
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    with bench_stores("tally-bench-enforce-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_ADMIN_TOKEN": ADMIN,
            "TALLY_LOG_LEVEL": "WARNING",
        }
        api = TallyProcess(["api"], env, stores.data_dir / "api.log").start()
        bare: dict[str, subprocess.Popen[bytes]] = {}
        try:
            ports = {BARE[kind]: free_port() for kind in KINDS}
            for kind in KINDS:
                log = stores.data_dir / f"{BARE[kind]}.log"
                bare[BARE[kind]] = start_bare(kind, ports[BARE[kind]], log)
            result = asyncio.run(measure(args, api.port, ports, api.url))
        finally:
            for process in bare.values():
                process.terminate()
                process.wait(10)
            api.stop()
    print(dumps(result))


if __name__ == "__main__":
    main()
