"""What the middleware's usage events cost ``tally up``: CPU per event, by how they travel.

Starts ``tally up`` on the benchmark's own stores and, in interleaved rounds, emits
``api_call`` events through ``tally_sdk.Tally.emit`` at a steady ``--rate`` (as an API
behind ``TallyMiddleware`` serving that many requests/s would) with each sending setup:
gzip on or off (the SDK before this change sent plain JSON, batched the same way),
``max_delay`` 0.5 s (the default) or 0.05 s, and batches of at most 2,000 events (the
default before 5,000; it matters above 4,000 events/s: ``--rate 9000``).  It reports
the CPU ``tally up`` (with its embedded broker) spent per event, until every event is
acknowledged, and the sending process's own CPU per event.  Redis works for ``tally up``
too (the aggregator's counters and de-duplication, the leases): its CPU per event is
reported beside, when the server runs on this host (shared with whatever else uses it).

    python -m bench.emit_cost --seconds 4 --rounds 3 --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, NamedTuple

import psutil
from tally_sdk import Tally

from bench.edge import cpu, redis_process
from bench.enforce import ADMIN, TOKEN, dumps, sign_up, spread
from bench.stores import bench_stores
from tests.support import TallyProcess


class Under(NamedTuple):
    """What is measured: ``tally up`` (with its children) and the Redis server it uses
    (``None`` when it runs on another host)."""

    tally: psutil.Process
    store: psutil.Process | None


SETUPS: dict[str, dict[str, Any]] = {
    "plain_json_0.5s": {"compress": False, "max_delay": 0.5},
    "gzip_0.5s": {"compress": True, "max_delay": 0.5},
    "gzip_0.05s": {"compress": True, "max_delay": 0.05},
    "gzip_0.5s_batch2000": {"compress": True, "max_delay": 0.5, "max_batch": 2000},
}


async def one(
    url: str, options: dict[str, Any], customers: list[str], args: Any, under: Under
) -> dict[str, float]:
    tally, store = under
    before_tally, before_here = cpu(tally), time.process_time()
    before_store = cpu(store) if store else 0.0
    sent = 0
    async with Tally(url, TOKEN, source="bench-emit", **options) as client:
        began = time.perf_counter()
        while (elapsed := time.perf_counter() - began) < args.seconds:
            due = int(elapsed * args.rate)
            for n in range(sent, due):
                client.emit(
                    "api_call",
                    customers[n % len(customers)],
                    endpoint="/v1/geocode",
                    method="POST",
                    status=200,
                )
            sent = max(sent, due)
            await asyncio.sleep(0.005)
        await client.flush()
    assert client.stats.accepted == sent, client.stats
    return {
        "events": sent,
        "tally_cpu_us_per_event": round((cpu(tally) - before_tally) / sent * 1e6, 1),
        **(
            {"redis_cpu_us_per_event": round((cpu(store) - before_store) / sent * 1e6, 1)}
            if store
            else {}
        ),
        "sender_cpu_us_per_event": round((time.process_time() - before_here) / sent * 1e6, 1),
        "requests": client.stats.requests,
    }


async def run(args: argparse.Namespace, url: str, under: Under) -> dict[str, Any]:
    customers = [customer for customer, _ in sign_up(url, 50)]
    await one(url, SETUPS["gzip_0.5s"], customers, args, under)  # warm up
    rounds = [
        {name: await one(url, options, customers, args, under) for name, options in SETUPS.items()}
        for _ in range(args.rounds)
    ]
    figures = ["tally_cpu_us_per_event", *(["redis_cpu_us_per_event"] if under.store else [])]
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "rounds": rounds,
        **{
            figure: {name: spread([r[name][figure] for r in rounds]) for name in SETUPS}
            for figure in figures
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=2000)
    args = parser.parse_args()
    with bench_stores("tally-bench-emit-") as stores:
        env = stores.env() | {
            "TALLY_SERVICE_TOKENS": TOKEN,
            "TALLY_ADMIN_TOKEN": ADMIN,
            "TALLY_LOG_LEVEL": "WARNING",
        }
        up = TallyProcess(["up"], env, stores.data_dir / "up.log").start()
        try:
            assert up.process is not None
            under = Under(psutil.Process(up.process.pid), redis_process(stores.redis_url))
            result = asyncio.run(run(args, up.url, under))
        finally:
            up.stop()
    print(dumps(result))


if __name__ == "__main__":
    main()
