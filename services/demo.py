"""``tally up --demo``: a synthetic workload, so a newcomer watches numbers move.

Three dozen customers call endpoints, store data, burn compute seconds and bring end
users, through the real HTTP ingest.  About 3 % of events are client retries (the
same source and id again) and about 1 % are invalid, to show what ingest and the
aggregator do with them.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx

from schemas.events import utcnow
from services.common.logging import get_logger
from services.runtime import Component, Runtime

log = get_logger("tally.demo")
CUSTOMERS = [f"demo-{i:02d}" for i in range(36)]
ENDPOINTS = ["/v1/search", "/v1/orders", "/v1/orders/{id}", "/v1/export", "/v1/users"]


async def start(runtime: Runtime) -> Component:
    settings = runtime.settings
    url = f"http://{settings.host}:{settings.port}/v1/events"
    runtime.background(drive(url, settings.service_tokens[0]), "demo")
    return Component("demo")


async def drive(url: str, token: str, per_second: int = 400, seed: int = 7) -> None:
    rng = random.Random(seed)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/cloudevents-batch+json",
    }
    previous: list[dict[str, Any]] = []
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0}
    async with httpx.AsyncClient(timeout=10) as client:
        for tick in range(10**9):
            batch = [event(rng) for _ in range(per_second)]
            batch += rng.sample(previous, k=min(len(previous), per_second * 3 // 100))
            batch += [invalid(rng) for _ in range(per_second // 100)]
            rng.shuffle(batch)
            previous = batch[:per_second]
            try:
                answer = (await client.post(url, content=_dumps(batch), headers=headers)).json()
                for key in totals:
                    totals[key] += int(answer.get(key, 0))
            except httpx.HTTPError as exc:
                log.info("demo waiting for ingest", error=repr(exc))
            if tick % 10 == 9:
                log.info("demo load", **totals)
            await asyncio.sleep(1)


def event(rng: random.Random) -> dict[str, Any]:
    customer = rng.choice(CUSTOMERS)
    kind = rng.choices(["api_call", "storage", "compute", "user"], weights=[80, 5, 10, 5])[0]
    data: dict[str, Any]
    if kind == "api_call":
        data = {
            "endpoint": rng.choice(ENDPOINTS),
            "method": rng.choice(["GET", "GET", "POST"]),
            "status": rng.choice([200, 200, 200, 201, 404, 429, 500]),
        }
    elif kind == "storage":
        data = {"value": str(Decimal(rng.randint(1, 200_000)) / 1000)}
    elif kind == "compute":
        data = {"value": str(Decimal(rng.randint(1, 90_000)) / 1000), "region": "eu-west-1"}
    else:
        data = {"user": f"user-{rng.randint(1, 60)}"}
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),  # fresh every run: a rerun is not a retry
        "source": "demo/app",
        "type": kind,
        "subject": customer,
        "time": (utcnow() - timedelta(seconds=rng.randint(0, 30))).isoformat(),
        "data": data,
    }


def invalid(rng: random.Random) -> dict[str, Any]:
    broken = event(rng)
    flaw = rng.choice(["value", "subject", "time"])
    if flaw == "value":
        broken["data"] = {"value": "lots"}
    elif flaw == "subject":
        del broken["subject"]
    else:
        broken["time"] = (utcnow() + timedelta(hours=2)).isoformat()
    return broken


def _dumps(batch: list[dict[str, Any]]) -> bytes:
    import orjson

    return orjson.dumps(batch)
