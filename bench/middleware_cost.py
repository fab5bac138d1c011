"""What ``TallyMiddleware`` costs the app per request, with nothing else running.

``bench.edge`` measures a whole machine (load generator, apps and ``tally up`` sharing
the cores); this isolates the middleware: an ASGI app called in-process, bare and behind
the middleware deciding from leases (the default) against the scripted stand-in Tally of
``tests.sdk_fake`` (grants as large as asked), with the events' batches sent (gzipped)
and counted in.  Interleaved rounds; CPU µs per request, medians and spread.

``--instructions`` counts instead of timing: ``bench.edge``'s FastAPI endpoint, plain
and behind the middleware, each run in a child under valgrind's callgrind for two
numbers of requests; the difference of the two counts over the difference of requests
is the instructions per request, start-up (imports, the first lease) cancelled out.  The
same code gives the same count whatever else the machine does, where its speed drifts
by tens of percent within minutes, so counts from different days compare (µs do not);
nothing in the counted runs goes by the clock (batches leave by count, terms outlast the
run), so a slower run does no more work.  ``plain ÷ middleware`` approximates the
requests/s ratio of two such apps on a core each (the server's and the kernel's work per
request, alike for both and not counted here, would bring it nearer 1).  The stand-in
Tally answers from a process of its own, uncounted.  ``--baseline-sdk`` adds
the middleware of another checkout's SDK.

    python -m bench.middleware_cost --requests 20000 --rounds 3
    python -m bench.middleware_cost --instructions [--baseline-sdk old/sdk]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tally_sdk import Tally, TallyMiddleware
from tally_sdk.asgi import ASGIApp, Message, Receive, Scope, Send

from bench.edge_app import api
from bench.enforce import dumps, spread
from tests.sdk_fake import LeaseModel, fake_tally

SCOPE: Scope = {  # as uvicorn hands bench.edge's requests over
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
    "scheme": "http",
    "method": "POST",
    "root_path": "",
    "path": "/v1/geocode",
    "raw_path": b"/v1/geocode",
    "query_string": b"",
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"x-api-key", b"k"),
        (b"content-length", b"14"),
        (b"content-type", b"application/json"),
    ],
    "state": {},
}
REQUEST: Message = {"type": "http.request", "body": b'{"q":"berlin"}', "more_body": False}
COUNTS = (1000, 3000)  # requests per counted run: their difference is what is divided
WARM_UP = 500
COUNTED_BATCH = 500  # events per batch in counted runs: a count, never a delay
CHILD_SECONDS = 900  # a counted child that runs longer is stuck (e.g. Tally gone)
COUNTED_TTL_MS = 3_600_000  # terms outlast a counted run: no renewal goes by the clock


async def bare(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def receive() -> Message:
    return REQUEST


async def ignore(message: Message) -> None:
    return None


async def serve(app: ASGIApp, tally: Tally | None, requests: int) -> None:
    """``requests`` requests, each with a scope of its own (FastAPI writes into it), and
    the events' delivery."""
    for _ in range(requests):
        await app({**SCOPE, "state": {}}, receive, ignore)
    if tally is not None:
        await tally.flush()


async def cpu_per_request(app: ASGIApp, tally: Tally | None, requests: int) -> float:
    """CPU µs per request, the events' delivery included."""
    start = time.process_time()
    await serve(app, tally, requests)
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


async def counted_run(middleware: bool, requests: int, url: str) -> None:
    """What a child under callgrind runs: warm up, then ``requests`` requests."""
    buffered = (WARM_UP + requests) * 2
    tally = Tally(url, "bench", max_buffer=buffered, max_batch=COUNTED_BATCH, max_delay=3600)
    app = TallyMiddleware(api(), tally=tally) if middleware else api()
    async with asyncio.timeout(CHILD_SECONDS):
        await serve(app, tally, WARM_UP)
        await serve(app, tally, requests)
        await tally.aclose()


async def stand_in(ttl_ms: int) -> None:
    """The stand-in Tally, in a process of its own so that its work is not counted with
    the app's: prints its URL, serves until stdin closes."""
    async with fake_tally(LeaseModel(room=10**9, ttl_ms=ttl_ms)) as fake:
        print(fake.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextmanager
def stand_in_tally(ttl_ms: int = COUNTED_TTL_MS) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The stand-in Tally's URL and process (``stand_in``), stopped on leaving."""
    command = [sys.executable, "-m", "bench.middleware_cost", "--stand-in", str(ttl_ms)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as fake:
        assert fake.stdout is not None and fake.stdin is not None
        url = fake.stdout.readline().decode().strip()
        if not url or fake.poll() is not None:
            raise RuntimeError("the stand-in Tally did not start")
        try:
            yield url, fake
        finally:
            fake.stdin.close()


def instructions(middleware: bool, requests: int, sdk: str | None, url: str) -> int:
    """Instructions callgrind counted in a child serving ``requests`` requests."""
    env = os.environ | {"PYTHONHASHSEED": "0"}  # the same dict layouts every run
    if sdk is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [sdk, env.get("PYTHONPATH")]))
    kind = "middleware" if middleware else "plain"
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += ["-m", "bench.middleware_cost", "--counted", kind, str(requests), url]
    done = subprocess.run(
        command, capture_output=True, env=env, check=False, timeout=CHILD_SECONDS * 2
    )
    found = re.search(rb"Collected : (\d+)", done.stderr)
    if done.returncode or found is None:
        raise RuntimeError(f"callgrind failed ({done.returncode}): {done.stderr[-2000:]!r}")
    return int(found.group(1))


def count(baseline_sdk: str | None) -> dict[str, Any]:
    """Instructions per request of each kind, two children at a time."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind: apt-get install valgrind (make wrk)")
    kinds: dict[str, tuple[bool, str | None]] = {"plain": (False, None), "tally": (True, None)}
    if baseline_sdk:
        sdk = Path(baseline_sdk).resolve()
        if not (sdk / "tally_sdk" / "__init__.py").is_file():  # else this SDK, silently
            raise SystemExit(f"--baseline-sdk {baseline_sdk}: no tally_sdk package in it")
        kinds["tally_baseline"] = (True, str(sdk))
    jobs = [(kind, n) for kind in kinds for n in COUNTS]
    with stand_in_tally() as (url, _):

        def run(job: tuple[str, int]) -> int:
            middleware, sdk = kinds[job[0]]
            return instructions(middleware, job[1], sdk, url)

        with ThreadPoolExecutor(2) as pool:
            totals = dict(zip(jobs, pool.map(run, jobs), strict=True))
    low, high = COUNTS
    per = {kind: round((totals[kind, high] - totals[kind, low]) / (high - low)) for kind in kinds}
    return {
        "instructions_per_request": per,
        "added_by_the_middleware": {k: v - per["plain"] for k, v in per.items() if k != "plain"},
        "plain_vs_middleware": {
            k: round(per["plain"] / v, 3) for k, v in per.items() if k != "plain"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--baseline-sdk", help="with --instructions: another checkout's sdk/")
    parser.add_argument("--counted", nargs=3, help=argparse.SUPPRESS)  # kind, requests, url
    parser.add_argument("--stand-in", type=int, metavar="TTL_MS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.counted:
        kind, requests, url = args.counted
        asyncio.run(counted_run(kind == "middleware", int(requests), url))
    elif args.stand_in is not None:
        asyncio.run(stand_in(args.stand_in))
    elif args.instructions:
        print(dumps(count(args.baseline_sdk)))
    else:
        print(dumps(asyncio.run(measure(args.requests, args.rounds))))


if __name__ == "__main__":
    main()
