"""Which HTTP client the SDK's decisions should use: CPU per decision, side by side.

Starts ``tally api`` on the benchmark's own stores (``bench.stores``) and, in interleaved
rounds, makes 16 concurrent callers ask for check-mode decisions through each candidate:

- ``httpx``: ``httpx.AsyncClient.post`` (what the SDK used before);
- ``aiohttp``: ``aiohttp.ClientSession.post`` (keep-alive pool);
- ``pipelined``: ``tally_sdk.Tally.check`` (``tally_sdk.pipelined``: a few keep-alive
  connections, requests written back to back, answers parsed by httptools);
- ``batch``: the same pipelined connections carrying ``/v1/enforce/batch``, the 16
  callers' checks coalesced into one request (possible only for one caller's key: the
  batch route authenticates once).

For each: decisions/s, CPU µs per decision in this process (the app's side) and in the
``tally api`` process (psutil), and their sum — the end-to-end price.  Medians and the
spread across rounds, as JSON.

    python -m bench.sdk_client --seconds 3 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import orjson
import psutil
from tally_sdk import Tally
from tally_sdk.pipelined import Pool

from bench.enforce import TOKEN, dumps, sign_up, spread
from bench.http_load import collector_paused, request
from bench.stores import bench_stores
from tests.support import TallyProcess

CALLERS = 16
Ask = Callable[[int], Awaitable[int]]  # caller number → decisions it got


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measure(
    ask: Ask, seconds: float, server: psutil.Process, callers: int = CALLERS
) -> dict[str, float]:
    """``callers`` loops asking for ``seconds``; rate and CPU per decision on both sides."""
    deadline = time.perf_counter() + seconds
    decided = 0

    async def caller(n: int) -> None:
        nonlocal decided
        while time.perf_counter() < deadline:
            got = await ask(n)  # not `decided += await …`: that reads `decided` first
            decided += got

    with collector_paused():
        here, there, began = time.process_time(), cpu(server), time.perf_counter()
        await asyncio.gather(*(caller(n) for n in range(callers)))
        elapsed = time.perf_counter() - began
        here, there = time.process_time() - here, cpu(server) - there
    return {
        "per_s": round(decided / elapsed),
        "client_cpu_us": round(here / decided * 1e6, 1),
        "tally_cpu_us": round(there / decided * 1e6, 1),
        "total_cpu_us": round((here + there) / decided * 1e6, 1),
    }


async def run(args: argparse.Namespace, url: str, server: psutil.Process) -> dict[str, Any]:
    accounts = sign_up(url, CALLERS)
    keys = [key for _, key in accounts]
    body = {"mode": "check", "endpoint": "/v1/geocode"}
    batch_body = {"checks": [body] * CALLERS}
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as hx,
        aiohttp.ClientSession(url) as session,
        Tally(url, TOKEN, source="bench") as tally,
    ):
        host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        coalesced = Pool(host, port, size=1)
        batch_request = request(
            host,
            port,
            "/v1/enforce/batch",
            orjson.dumps(batch_body),
            {"Authorization": f"Bearer {keys[0]}"},
        )

        async def with_httpx(n: int) -> int:
            auth = {"Authorization": f"Bearer {keys[n]}"}
            (await hx.post("/v1/enforce", json=body, headers=auth)).raise_for_status()
            return 1

        async def with_aiohttp(n: int) -> int:
            auth = {"Authorization": f"Bearer {keys[n]}"}
            async with session.post("/v1/enforce", json=body, headers=auth) as answer:
                answer.raise_for_status()
                await answer.json()
            return 1

        async def pipelined(n: int) -> int:
            decision = await tally.check(key=keys[n], endpoint="/v1/geocode")
            assert decision.allowed, decision
            return 1

        async def batch(n: int) -> int:
            reply = await coalesced.request(batch_request, 10)
            results = orjson.loads(reply.body)["results"]
            assert all(r["status"] == 200 for r in results), results
            return len(results)

        candidates: dict[str, Ask] = {
            "httpx": with_httpx,
            "aiohttp": with_aiohttp,
            "pipelined": pipelined,
            "batch": batch,
        }
        callers = {"batch": 1}  # one request in flight carries the 16 callers' checks
        for name, ask in candidates.items():  # warm up: connections, caches
            await measure(ask, 0.5, server, callers.get(name, CALLERS))
        rounds = [
            {
                name: await measure(ask, args.seconds, server, callers.get(name, CALLERS))
                for name, ask in candidates.items()
            }
            for _ in range(args.rounds)
        ]
        coalesced.close()
    metrics = ("per_s", "client_cpu_us", "tally_cpu_us", "total_cpu_us")
    return {
        "callers": CALLERS,
        "seconds_per_round": args.seconds,
        "rounds": rounds,
        "across_rounds": {
            name: {m: spread([r[name][m] for r in rounds]) for m in metrics} for name in candidates
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with bench_stores("tally-bench-sdk-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_ADMIN_TOKEN": "bench-admin",
            "TALLY_LOG_LEVEL": "WARNING",
            "TALLY_IP_LIMIT_PER_SECOND": "0",  # every caller here is 127.0.0.1
        }
        api = TallyProcess(["api"], env, stores.data_dir / "api.log").start()
        try:
            assert api.process is not None
            result = asyncio.run(run(args, api.url, psutil.Process(api.process.pid)))
        finally:
            api.stop()
    print(dumps(result))


if __name__ == "__main__":
    main()
