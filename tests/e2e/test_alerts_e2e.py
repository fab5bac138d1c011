"""Usage alerts through the real pipeline: events over HTTP into ``tally ingest``, Tansu,
``tally aggregator``, and ``alert.triggered`` read back from the notification stream.

The product brief's scenario: a free customer (1,000 calls included, a hard quota of
1,000) gets exactly one alert at 800, 900 and 1,000 calls; re-sent events (client
retries) and a replay of the whole partition (a new consumer group, after a kill -9)
fire nothing more and count nothing twice.  One request crossing 80 % and 90 % at once
fires only 90 %; a customer's own rule (usage 500) fires; a new month fires afresh.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis as AsyncRedis

from schemas import redis_keys
from schemas.events import from_micros, utcnow
from schemas.notifications import STREAM
from schemas.windows import Window, bucket_id
from services.billing.notification.alerts.compile import AlertCompiler
from services.common.settings import Settings
from tests.accounts_support import running_api, sign_up
from tests.conftest import UNWATCHED_GROUP, env_for
from tests.integration.test_alert_api import alerts_client
from tests.support import TallyProcess, sample_event, wait_for

pytestmark = pytest.mark.slow
_ids = itertools.count()


def test_thresholds_fire_once_each_through_the_pipeline(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    brief, both, ruled, months = asyncio.run(_customers(settings))
    env = env_for(settings)
    aggregator = TallyProcess(["aggregator"], env, tmp_path / "agg.log").start()
    ingest = TallyProcess(["ingest"], env | UNWATCHED_GROUP, tmp_path / "ingest.log").start()
    sync = redis.Redis.from_url(settings.redis_url)
    try:
        send = _sender(ingest.url, settings.service_tokens[0])

        def alerts(customer: str) -> list[dict[str, Any]]:
            return _alerts(sync, customer)

        def values(customer: str) -> list[str]:
            return [a["data"]["threshold"]["value"] for a in alerts(customer)]

        def settle(customer: str, calls: int) -> None:
            wait_for(lambda: _month_calls(sync, customer) == calls, 60, "counted", aggregator.tail)

        # 800, 900, 1,000 calls: one alert each, as they are reached
        retried = send(brief, 800)
        settle(brief, 800)
        wait_for(lambda: values(brief) == ["80"], 30, "80 %", aggregator.tail)
        send(brief, 100)
        wait_for(lambda: values(brief) == ["80", "90"], 30, "90 %", aggregator.tail)
        last = send(brief, 100)
        wait_for(lambda: values(brief) == ["80", "90", "100"], 30, "100 %", aggregator.tail)

        # client retries of both batches, then one new call behind them in the partition
        send(brief, 0, again=retried + last)
        send(brief, 1)
        settle(brief, 1001)
        assert values(brief) == ["80", "90", "100"]

        # one request crossing 80 % and 90 % at once: only 90 %
        send(both, 950)
        settle(both, 950)
        # a customer's own rule
        send(ruled, 450)
        settle(ruled, 450)
        send(ruled, 100)
        settle(ruled, 550)
        # last month's 850 calls, then this month's: 80 % in each month
        start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        send(months, 850, at=start - timedelta(hours=1))
        send(months, 850)
        settle(months, 850)
        wait_for(lambda: len(alerts(months)) == 2, 30, "each month's alert", aggregator.tail)

        # the whole partition again: kill -9, a new consumer group reads from the start
        aggregator.kill()
        aggregator.env["TALLY_CONSUMER_GROUP"] = f"replay-{uuid.uuid4().hex[:8]}"
        aggregator.start()
        send(brief, 1)
        settle(brief, 1002)
        for customer in (both, ruled):
            send(customer, 1)
        settle(both, 951)
        settle(ruled, 551)
    finally:
        aggregator.stop()
        ingest.stop()

    fired = alerts(brief)
    assert [a["data"]["usage"] for a in fired] == ["800", "900", "1000"]
    assert len({a["id"] for a in fired}) == 3
    assert fired[0]["data"]["limit"] == "1000" and fired[0]["data"]["rule"] == "plan"
    assert fired[0]["data"]["threshold"] == {"kind": "percent", "value": "80", "quantity": "800"}
    assert values(both) == ["90"]
    [own] = alerts(ruled)
    assert own["data"]["threshold"] == {"kind": "usage", "value": "500", "quantity": "500"}
    assert own["data"]["rule"].startswith("alr_") and own["data"]["usage"] == "550"
    periods = [a["data"]["period"]["start"] for a in alerts(months)]
    assert sorted(periods) == sorted(
        [f"{start:%Y-%m-%dT%H:%M:%SZ}", f"{start - timedelta(hours=1):%Y-%m-01T00:00:00Z}"]
    )
    assert values(months) == ["80", "80"]
    sync.close()


async def _customers(settings: Settings) -> tuple[str, str, str, str]:
    """Four free-plan customers; the third with a rule of its own (usage 500)."""
    async with running_api(settings) as api:
        accounts = [await sign_up(api, plan="free") for _ in range(4)]
    customers = tuple(a.customer for a in accounts)
    async with AsyncConnectionPool(settings.database_url, open=False) as pool:
        client = AsyncRedis.from_url(settings.redis_url)
        compiler = AlertCompiler(pool, client)
        for customer in customers:
            await compiler.customer(customer)
        async with alerts_client(settings, pool, client) as http:
            added = await http.post(
                f"/v1/customers/{customers[2]}/alerts",
                json={"meter": "api_calls", "kind": "usage", "thresholds": [500]},
                headers=accounts[2].auth,
            )
            assert added.status_code == 201, added.text
        await client.aclose()
    return customers[0], customers[1], customers[2], customers[3]


def _sender(url: str, token: str) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def send(
        customer: str,
        calls: int,
        again: list[dict[str, Any]] | None = None,
        at: datetime | None = None,
    ) -> list[dict[str, Any]]:
        when = (at or utcnow()).isoformat()
        events = again or [
            sample_event(subject=customer, id=f"{customer}-{next(_ids)}", time=when)
            for _ in range(calls)
        ]
        answer = httpx.post(f"{url}/v1/events", content=orjson.dumps(events), headers=headers)
        assert answer.status_code == 202, answer.text
        return events

    return send


def _alerts(client: redis.Redis, customer: str) -> list[dict[str, Any]]:
    entries: Any = client.xrange(STREAM)
    found = [orjson.loads(fields[b"n"]) for _, fields in entries]
    return [n for n in found if n["customer"] == customer and n["type"] == "alert.triggered"]


def _month_calls(client: redis.Redis, customer: str) -> int:
    key = redis_keys.counters(
        customer, "api_calls", Window.MONTH, bucket_id(Window.MONTH, utcnow())
    )
    raw: Any = client.hget(key, "*")
    return int(from_micros(int(raw or 0)))
