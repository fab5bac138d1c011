"""The usage API over real Redis and PostgreSQL: live windows, history, and bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import envelope
from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.events import utcnow
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.processor import BatchProcessor, Record
from services.aggregator.redis_sink import RedisSink
from services.api.usage.routes import router
from services.common.auth import Authenticator
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from services.runtime import Component, http_app


@pytest.fixture
async def api(
    redis: Redis, pool: AsyncConnectionPool, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    auth = Authenticator(settings, redis, pool)
    app = http_app([Component("api", [router(redis, pool, auth)])])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {settings.service_tokens[0]}"},
    ) as c:
        yield c


async def aggregate(
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    meters: dict[str, list[Meter]],
    events: list[StoredEvent],
) -> None:
    async def dead_letter(_: Record, reason: str) -> None:
        raise AssertionError(reason)

    processor = BatchProcessor(
        ClickHouseSink(ch),
        RedisSink(redis),
        lambda: meters,
        DedupeWindow(timedelta(hours=24)),
        dead_letter,
        settings.kafka_incarnation,
    )
    payload = envelope.encode(events[0].customer, events, utcnow())
    await processor.process([Record("tally.events", 0, 1, payload)])


def at(minutes_ago: int) -> datetime:
    return utcnow() - timedelta(minutes=minutes_ago)


def call(customer: str, kind: str, ident: str, when: datetime, **dims: str) -> StoredEvent:
    return StoredEvent(ident, "src", kind, customer, when, Decimal(1), dims, utcnow())


async def usage(api: httpx.AsyncClient, customer: str, **params: Any) -> dict[str, Any]:
    response = await api.get(f"/v1/customers/{customer}/usage", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_minute_hour_and_grouped_views(
    api: httpx.AsyncClient,
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    meters: dict[str, list[Meter]],
    tenant: str,
) -> None:
    customer = f"{tenant}-u"
    now = utcnow().replace(second=30)
    events = [
        call(customer, "api_call", "1", now - timedelta(minutes=2), endpoint="/a"),
        call(customer, "api_call", "2", now - timedelta(minutes=2), endpoint="/b"),
        call(customer, "api_call", "3", now, endpoint="/a"),
    ]
    await aggregate(settings, ch, redis, meters, events)
    start = (now - timedelta(minutes=3)).replace(second=0, microsecond=0)
    body = await usage(
        api, customer, meter="api_calls", window="minute", **{"from": start.isoformat()}
    )
    assert [p["value"] for p in body["data"]] == ["0", "2", "0", "1"]
    grouped = await usage(
        api,
        customer,
        meter="api_calls",
        window="hour",
        group_by="endpoint",
        **{"from": start.isoformat()},
    )
    totals: dict[str, int] = {}
    for point in grouped["data"]:
        totals[point["groups"]["endpoint"]] = totals.get(point["groups"]["endpoint"], 0) + int(
            point["value"]
        )
    assert totals == {"/a": 2, "/b": 1}


async def test_old_days_come_from_the_rollups(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-h"
    day = (utcnow() - timedelta(days=60)).date()
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO usage_daily (customer, meter, day, group_key, value, watermark)"
            " VALUES (%s, 'compute_seconds', %s, '*', 12.5, now())",
            (customer, day),
        )
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    body = await usage(
        api,
        customer,
        meter="compute_seconds",
        **{"from": start.isoformat(), "to": (start + timedelta(days=2)).isoformat()},
    )
    assert [p["value"] for p in body["data"]] == ["12.5", "0"]


async def test_meters_are_listed(api: httpx.AsyncClient) -> None:
    names = [m["name"] for m in (await api.get("/v1/meters")).json()["meters"]]
    assert {"api_calls", "storage_gb", "compute_seconds", "active_users"} <= set(names)


@pytest.mark.parametrize(
    ("params", "field", "reason"),
    [
        ({"meter": "nope"}, "meter", "unknown meter 'nope'"),
        ({}, "query.meter", "Field required"),
        ({"meter": "api_calls", "window": "week"}, "query.window", "Input should be"),
        ({"meter": "api_calls", "from": "2026-11-01T00:00:00"}, "from", "must carry a UTC offset"),
        ({"meter": "api_calls", "from": "yesterday"}, "query.from", "valid datetime"),
        (
            {"meter": "api_calls", "from": "2026-11-21T00:00:00Z", "to": "2026-11-20T00:00:00Z"},
            "from",
            "must be before `to`",
        ),
        (
            {"meter": "api_calls", "window": "minute", "from": "2026-01-01T00:00:00Z"},
            "from",
            "kept for 3 hours",
        ),
        (
            {"meter": "api_calls", "window": "day", "from": "2010-01-01T00:00:00Z"},
            "from",
            "more than 2000 days",
        ),
        (
            {"meter": "api_calls", "window": "minute", "to": "9999-01-01T00:00:00Z"},
            "to",
            "must lie between 1970 and 2999",
        ),
        ({"meter": "api_calls", "from": "0001-01-01T00:00:00+01:00"}, "from", "must lie between"),
        ({"meter": "api_calls", "group_by": "method"}, "group_by", "groups by endpoint"),
        ({"meter": "storage_gb", "group_by": "endpoint"}, "group_by", "groups by (none)"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(
    api: httpx.AsyncClient, params: dict[str, str], field: str, reason: str
) -> None:
    response = await api.get("/v1/customers/acme/usage", params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    [error] = response.json()["errors"]
    assert error["field"] == field and reason in error["reason"]


async def test_a_malformed_customer_id_is_422(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/customers/{acme}/usage", params={"meter": "api_calls"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "path.customer"
