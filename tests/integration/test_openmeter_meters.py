"""OpenMeter's meter API, driven by the real ``openmeter`` SDK against a served Tally api:
the meters listed and read, usage queried by window, grouped and folded, and each bad
query refused with the parameter named."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import httpx
import pytest
from openmeter import Client as OpenMeter
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.events import utcnow
from schemas.windows import Window, bucket_id, bucket_start
from services.api import service as api_service
from services.common.settings import Settings
from services.runtime import Runtime, http_app
from tests.http_support import serving

TOKEN = "test-token"


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[str]:
    async with Runtime(settings) as runtime:
        app = http_app([await api_service.start(runtime)])
        async with serving(app) as url:
            yield url


async def _calls(redis: Redis, customer: str, day_offset: int, endpoint: str, calls: int) -> None:
    """``calls`` API calls to ``endpoint`` in a day bucket, as the aggregator counts them."""
    day = utcnow() - timedelta(days=day_offset)
    key = redis_keys.counters(customer, "api_calls", Window.DAY, bucket_id(Window.DAY, day))
    micros = calls * 1_000_000
    await redis.hincrby(key, redis_keys.TOTAL, micros)
    await redis.hincrby(key, redis_keys.group_field((endpoint,)), micros)
    await redis.expire(key, 86400)


async def test_the_openmeter_sdk_lists_reads_and_queries_meters(
    served: str, redis: Redis, tenant: str
) -> None:
    customer = f"{tenant}-acme"
    await _calls(redis, customer, 1, "/v1/search", 3)
    await _calls(redis, customer, 0, "/v1/search", 2)
    await _calls(redis, customer, 0, "/v1/geocode", 4)
    client = OpenMeter(endpoint=served, token=TOKEN)

    meters = await asyncio.to_thread(client.meters.list)
    by_slug = {m.slug: m for m in meters}
    assert by_slug["api_calls"].aggregation == "COUNT"
    assert by_slug["api_calls"].event_type == "api_call"
    assert by_slug["api_calls"].group_by == {"endpoint": "$.endpoint"}
    assert by_slug["compute_seconds"].value_property == "$.value"
    one = await asyncio.to_thread(client.meters.get, "active_users")
    assert one.aggregation == "UNIQUE_COUNT" and one.value_property == "$.user"

    today = bucket_start(Window.DAY, utcnow())
    start, end = today - timedelta(days=1), today + timedelta(days=1)
    daily = await asyncio.to_thread(
        client.meters.query_json,
        "api_calls",
        from_parameter=start,
        to=end,
        window_size="DAY",
        subject=[customer],
    )
    assert [(r.window_start, r.value, r.subject) for r in daily.data] == [
        (start, 3, customer),
        (today, 6, customer),
    ]
    grouped = await asyncio.to_thread(
        client.meters.query_json,
        "api_calls",
        from_parameter=start,
        to=end,
        subject=[customer],
        group_by=["endpoint"],
    )
    folded = {r.group_by["endpoint"]: Decimal(str(r.value)) for r in grouped.data}
    assert folded == {"/v1/search": 5, "/v1/geocode": 4}


async def test_windows_in_a_time_zone(served: str, pool: AsyncConnectionPool, tenant: str) -> None:
    """``windowTimeZone`` as OpenMeter takes it: New York's days, the 23-hour one too."""
    customer = f"{tenant}-ny"
    first = datetime(2026, 3, 7, 5, tzinfo=UTC)  # midnight in New York
    async with pool.connection() as conn:
        await conn.cursor().executemany(
            "INSERT INTO usage_hourly (customer, meter, hour, value, watermark)"
            " VALUES (%s, 'api_calls', %s, 2, now())",
            [(customer, first + timedelta(hours=i)) for i in range(72)],
        )
    client = OpenMeter(endpoint=served, token=TOKEN)
    new_york = ZoneInfo("America/New_York")
    result = await asyncio.to_thread(
        client.meters.query_json,
        "api_calls",
        from_parameter=datetime(2026, 3, 7, tzinfo=new_york),
        to=datetime(2026, 3, 9, tzinfo=new_york),
        window_size="DAY",
        window_time_zone="America/New_York",
        subject=[customer],
    )
    assert [(r.window_start, r.window_end, r.value) for r in result.data] == [
        (first, datetime(2026, 3, 8, 5, tzinfo=UTC), 48),
        (datetime(2026, 3, 8, 5, tzinfo=UTC), datetime(2026, 3, 9, 4, tzinfo=UTC), 46),
    ]


@pytest.mark.parametrize(
    ("query", "status", "says"),
    [
        ("", 400, "subject: name the subjects"),
        ("?subject=a&windowSize=WEEK", 400, "windowSize: one of MINUTE, HOUR, DAY, MONTH"),
        ("?subject=a&windowTimeZone=Mars/Base", 400, "windowTimeZone: unknown time zone"),
        ("?subject=a&windowTimeZone=Asia/Kathmandu&windowSize=DAY", 400, "UTC+05:45"),
        ("?subject=a&groupBy=model", 400, "groups by endpoint; got model"),
        ("?subject=a&from=yesterday", 400, "from: not an RFC 3339 date-time"),
        ("?subject=a&colour=blue", 400, "unknown query parameters: colour"),
    ],
)
async def test_bad_queries_are_refused_naming_the_parameter(
    served: str, query: str, status: int, says: str
) -> None:
    async with httpx.AsyncClient(base_url=served) as http:
        reply = await http.get(
            f"/api/v1/meters/api_calls/query{query}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert says in reply.json()["detail"]


async def test_unknown_meters_and_unfoldable_queries(served: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=served, headers=headers) as http:
        assert (await http.get("/api/v1/meters/nope")).status_code == 404
        assert (await http.get("/api/v1/meters/nope/query?subject=a")).status_code == 404
        distinct = await http.get("/api/v1/meters/active_users/query?subject=a")
        assert distinct.status_code == 400 and "windowSize" in distinct.json()["detail"]
        assert (
            await http.get("/api/v1/meters", headers={"Authorization": "Bearer x"})
        ).status_code == 401
