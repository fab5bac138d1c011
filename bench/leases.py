"""Lease benchmark: what admitting calls costs the centre, per call, with and without leases.

Runs the two scripts an admission can take in the benchmark's own Redis database
(``bench.stores``), from this process over the API's pipelined connection, with
``--callers`` concurrent callers spread over ``--customers`` accounts far from their
limits (100,000 calls a second, a soft quota of 10⁹):

- ``enforce_check`` / ``enforce_reserve``: one ``enforce.lua`` decision per call;
- ``lease_renew``: ``lease.lua`` as the SDK runs it in steady state, renewing its lease
  with everything spent and asking for ``--want`` calls (far from a limit the grant is
  all of it, so one call of the script admits ``--want`` calls).

In interleaved rounds (this machine drifts): script calls/s for each, calls admitted/s
(script calls times calls granted), and the ratio of admitted calls/s through leases to
through ``enforce_check``, per round, then median, min and max.  No HTTP: the HTTP cost
is one request per script call on either path (``bench.enforce`` measures it).

    python -m bench.leases --seconds 5 --rounds 3 --want 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis

from bench.stores import bench_redis
from schemas.events import utcnow
from schemas.plans import Per, RateLimit
from services.api.enforcement.leaser import LeaseAsk, LeaseMode, Leaser, new_lease_id
from services.api.enforcement.limiter import Ask, Limiter, Mode
from services.api.enforcement.pipelined import Pipelined
from tests.lease_support import METER, put_account

RATE = RateLimit(name="bench-per-second", limit=100_000, per=Per.SECOND)
Call = Callable[[int], Awaitable[int]]  # caller number → calls admitted


async def _accounts(url: str, customers: int) -> list[str]:
    redis = Redis.from_url(url)
    names = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(customers)]
    for name in names:
        await put_account(redis, name, quota=10**9, rates=(RATE,), hard=False)
    await redis.aclose()
    return names


async def _run(call: Call, callers: int, seconds: float) -> tuple[float, float]:
    """(script calls/s, calls admitted/s) of ``callers`` concurrent callers."""
    calls, admitted = 0, 0
    deadline = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal calls, admitted
        while time.perf_counter() < deadline:
            granted = await call(n)  # not `admitted += await …`: that reads before awaiting
            admitted += granted
            calls += 1

    began = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    elapsed = time.perf_counter() - began
    return calls / elapsed, admitted / elapsed


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    names = await _accounts(url, args.customers)
    connection = Pipelined(url, 5.0)
    limiter = Limiter(connection, 300_000)
    leaser = Leaser(connection, 2000, 300_000, 8)
    leases = [new_lease_id() for _ in range(args.callers)]
    spent = [0] * args.callers
    events = iter(range(10**12))

    async def check(n: int) -> int:
        ask = Ask(meter=METER, quantity=Decimal(1), mode=Mode.CHECK)
        return int((await limiter.decide(names[n % len(names)], ask, utcnow())).allowed)

    async def reserve(n: int) -> int:
        digest = next(events).to_bytes(8, "big")
        ask = Ask(meter=METER, quantity=Decimal(1), mode=Mode.RESERVE, digest=digest)
        return int((await limiter.decide(names[n % len(names)], ask, utcnow())).allowed)

    async def renew(n: int) -> int:
        mode = LeaseMode.RENEW if spent[n] else LeaseMode.TAKE
        ask = LeaseAsk(leases[n], mode, METER, args.want, spent[n])
        grant = await leaser.ask(names[n % len(names)], ask, utcnow())
        spent[n] = grant.granted  # the holder spends it all before renewing
        return grant.granted

    kinds: dict[str, Call] = {
        "enforce_check": check,
        "enforce_reserve": reserve,
        "lease_renew": renew,
    }
    try:
        for call in kinds.values():  # warm up: scripts loaded, connection open
            await _run(call, args.callers, min(1.0, args.seconds))
        rounds = []
        for _ in range(args.rounds):
            rounds.append(
                {name: await _run(call, args.callers, args.seconds) for name, call in kinds.items()}
            )
    finally:
        await connection.aclose()
    script = [{k: round(v[0]) for k, v in r.items()} for r in rounds]
    admitted = [{k: round(v[1]) for k, v in r.items()} for r in rounds]
    ratio = [r["lease_renew"] / r["enforce_check"] for r in admitted]
    return {
        "callers": args.callers,
        "customers": args.customers,
        "want": args.want,
        "seconds_per_round": args.seconds,
        "script_calls_per_s_per_round": script,
        "calls_admitted_per_s_per_round": admitted,
        "script_calls_per_s_across_rounds": {k: _spread([r[k] for r in script]) for k in kinds},
        "calls_admitted_per_s_across_rounds": {k: _spread([r[k] for r in admitted]) for k in kinds},
        "admitted_ratio_lease_to_check_per_round": [round(x, 1) for x in ratio],
        "admitted_ratio_lease_to_check": _spread(ratio),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--want", type=int, default=100)
    args = parser.parse_args()
    with bench_redis() as url:
        print(json.dumps(asyncio.run(measure(args, url)), indent=2))


if __name__ == "__main__":
    main()
