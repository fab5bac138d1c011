"""What ``TallyMiddleware`` costs the app's CPU per request, with nothing else running.

``bench.edge`` measures a whole machine (load generator, apps and ``tally up`` sharing
the cores); this isolates the middleware: an ASGI app called in-process, bare and behind
the middleware deciding from leases (the default) against the scripted stand-in Tally of
``tests.sdk_fake`` (grants as large as asked), with the events' batches sent (gzipped)
and counted in.  Interleaved rounds; CPU µs per request, medians and spread.

    python -m bench.middleware_cost --requests 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from tally_sdk import Tally, TallyMiddleware
from tally_sdk.asgi import ASGIApp, Message, Receive, Scope, Send

from bench.enforce import dumps, spread
from tests.sdk_fake import LeaseModel, fake_tally

SCOPE: Scope = {
    "type": "http",
    "path": "/v1/geocode",
    "method": "POST",
    "headers": [(b"x-api-key", b"k")],
    "client": ("127.0.0.1", 1),
}


async def bare(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def ignore(message: Message) -> None:
    return None


async def cpu_per_request(app: ASGIApp, tally: Tally | None, requests: int) -> float:
    """CPU µs per request, the events' delivery included."""
    start = time.process_time()
    for _ in range(requests):
        await app(SCOPE, receive, ignore)
    if tally is not None:
        await tally.flush()
    return (time.process_time() - start) / requests * 1e6


async def measure(requests: int, rounds: int) -> dict[str, Any]:
    async with fake_tally(LeaseModel(room=10**9)) as fake:
        tally = Tally(fake.url, "bench", max_buffer=requests * 2)
        apps: dict[str, tuple[ASGIApp, Tally | None]] = {
            "bare": (bare, None),
            "middleware_leases": (TallyMiddleware(bare, tally=tally), tally),
        }
        for app, client in apps.values():  # warm up: the lease, connections
            await cpu_per_request(app, client, 2000)
        runs: dict[str, list[float]] = {kind: [] for kind in apps}
        for _ in range(rounds):
            for kind, (app, client) in apps.items():
                runs[kind].append(round(await cpu_per_request(app, client, requests), 1))
        await tally.aclose()
    added = [round(m - b, 1) for m, b in zip(runs["middleware_leases"], runs["bare"], strict=True)]
    return {
        "requests_per_run": requests,
        "cpu_us_per_request": {kind: spread(values) for kind, values in runs.items()},
        "middleware_adds_us": spread(added),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(dumps(asyncio.run(measure(args.requests, args.rounds))))


if __name__ == "__main__":
    main()
