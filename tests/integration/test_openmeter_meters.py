"""OpenMeter's meter API, driven by the real ``openmeter`` SDK against a served Tally api:
the meters listed and read, usage queried by window, grouped and folded, and each bad
query refused with the parameter named."""

from __future__ import annotations

import asyncio
import uuid
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
from tests.accounts_support import ADMIN
from tests.http_support import serving

TOKEN = "test-token"


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[str]:
    settings = settings.model_copy(update={"admin_token": ADMIN["Authorization"].split()[1]})
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
        ("?subject=a&groupBy=model", 400, "groupBy: meter 'api_calls' has no group 'model'"),
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


async def _llm_meter(served: str, aggregation: str) -> str:
    """A meter grouped by model and region, made over the admin API."""
    name = f"om_{aggregation}_{uuid.uuid4().hex[:8]}"
    body = {
        "name": name,
        "event_type": "llm_call",
        "aggregation": aggregation,
        "value_property": "$.user" if aggregation == "unique_count" else "$.tokens",
        "group_by": ["$.model", "$.region"],
    }
    async with httpx.AsyncClient(base_url=served) as http:
        made = await http.post("/v1/admin/meters", json=body, headers=ADMIN)
    assert made.status_code == 201, made.text
    return name


async def _tokens(
    redis: Redis, customer: str, meter: str, counts: dict[tuple[str, str], int]
) -> None:
    key = redis_keys.counters(customer, meter, Window.DAY, bucket_id(Window.DAY, utcnow()))
    for group, tokens in counts.items():
        await redis.hincrby(key, redis_keys.group_field(group), tokens * 1_000_000)
        await redis.hincrby(key, redis_keys.TOTAL, tokens * 1_000_000)
    await redis.expire(key, 86400)


async def test_groups_are_kept_in_part_and_filtered_as_openmeter_asks(
    served: str, redis: Redis, tenant: str
) -> None:
    """``groupBy`` of some of a meter's dimensions merges the others; ``filterGroupBy``
    keeps one value — as the SDK sends it and as OpenMeter's spec writes it."""
    meter, customer = await _llm_meter(served, "sum"), f"{tenant}-llm"
    counts = {("gpt", "eu"): 10, ("gpt", "us"): 20, ("claude", "eu"): 5, ("claude", "us"): 1}
    await _tokens(redis, customer, meter, counts)
    client = OpenMeter(endpoint=served, token=TOKEN)
    start = bucket_start(Window.DAY, utcnow())
    span = {"from_parameter": start, "to": start + timedelta(days=1), "subject": [customer]}

    def query(**asked: object) -> dict[str, Decimal]:
        result = client.meters.query_json(meter, **span, **asked)  # type: ignore[arg-type]
        return {",".join(r.group_by.values()): Decimal(str(r.value)) for r in result.data}

    assert await asyncio.to_thread(query, group_by=["model"]) == {"gpt": 30, "claude": 6}
    assert await asyncio.to_thread(query, group_by=["region"]) == {"eu": 15, "us": 21}
    eu = await asyncio.to_thread(query, filter_group_by={"region": "eu"})
    assert eu == {"": 15}
    eu_by_model = await asyncio.to_thread(
        query, filter_group_by={"region": "eu"}, group_by=["model"]
    )
    assert eu_by_model == {"gpt": 10, "claude": 5}
    async with httpx.AsyncClient(
        base_url=served, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as http:
        spec_form = await http.get(
            f"/api/v1/meters/{meter}/query",
            params={
                "subject": customer,
                "filterGroupBy[model]": "claude",
                "filterGroupBy[region]": "us",
            },
        )
    assert spec_form.status_code == 200, spec_form.text
    assert [Decimal(str(r["value"])) for r in spec_form.json()["data"]] == [1]


@pytest.mark.parametrize(
    ("aggregation", "query", "says"),
    [
        ("sum", "groupBy=colour", "groupBy: meter '{meter}' has no group 'colour'"),
        (
            "sum",
            "filterGroupBy[colour]=red",
            "filterGroupBy: meter '{meter}' has no group 'colour'",
        ),
        ("sum", "filterGroupBy=model", "filterGroupBy: a map of group names to values"),
        ("sum", "filterGroupBy[model=gpt", "unknown query parameters: filterGroupBy[model"),
        ("sum", "filterGroupBy[model]=a&filterGroupBy[model]=b", "[model]: given twice"),
        (
            "sum",
            "filterGroupBy=%7B'model'%3A+1%7D",
            "filterGroupBy: a map of group names to values",
        ),
        ("unique_count", "windowSize=DAY&groupBy=model", "cannot merge groups: keep or fix region"),
    ],
)
async def test_bad_selections_are_refused_naming_the_parameter(
    served: str, aggregation: str, query: str, says: str
) -> None:
    meter = await _llm_meter(served, aggregation)
    async with httpx.AsyncClient(base_url=served) as http:
        reply = await http.get(
            f"/api/v1/meters/{meter}/query?subject=a&{query}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert reply.status_code == 400, reply.text
    assert says.format(meter=meter) in reply.json()["detail"]


async def test_a_distinct_count_answers_one_group_when_every_other_is_fixed(
    served: str, redis: Redis, tenant: str
) -> None:
    meter, customer = await _llm_meter(served, "unique_count"), f"{tenant}-seats"
    await _tokens(redis, customer, meter, {("gpt", "eu"): 3, ("gpt", "us"): 4})
    start = bucket_start(Window.DAY, utcnow())
    async with httpx.AsyncClient(
        base_url=served, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as http:
        reply = await http.get(
            f"/api/v1/meters/{meter}/query",
            params={
                "subject": customer,
                "windowSize": "DAY",
                "from": start.isoformat(),
                "to": (start + timedelta(days=1)).isoformat(),
                "groupBy": "model",
                "filterGroupBy[region]": "us",
            },
        )
    assert reply.status_code == 200, reply.text
    assert [(r["groupBy"], r["value"]) for r in reply.json()["data"]] == [({"model": "gpt"}, 4)]
