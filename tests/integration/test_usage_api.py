"""The usage API over real Redis and PostgreSQL: live windows, history, top groups, the
cached meters, and bad input."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import envelope, redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, utcnow
from schemas.windows import Window, bucket_id
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.processor import BatchProcessor, Record
from services.aggregator.redis_sink import RedisSink
from services.api.catalog import meter_store
from services.api.usage.routes import Usage, fast_routes, router
from services.common.auth import Authenticator
from services.common.clickhouse import ClickHouse
from services.common.meter_cache import MeterCache
from services.common.settings import Settings
from services.runtime import Component, http_app


@pytest.fixture
async def meter_cache(pool: AsyncConnectionPool, database_url: str) -> AsyncIterator[MeterCache]:
    """The api's meter cache; its safety-net reload far off, so only a notification
    explains a change seen within seconds."""
    cache = MeterCache(pool, database_url, max_age=600)
    await cache.start()
    yield cache
    await cache.stop()


@pytest.fixture
async def api(
    redis: Redis, pool: AsyncConnectionPool, settings: Settings, meter_cache: MeterCache
) -> AsyncIterator[httpx.AsyncClient]:
    usage = Usage(redis, pool, Authenticator(settings, redis, pool), meter_cache)
    routes = [router(usage, meter_cache)]
    app = http_app([Component("api", routes, fast_routes=fast_routes(usage))])
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
        ({"meter": "nope"}, "query.meter", "unknown meter 'nope'"),
        ({}, "query.meter", "Field required"),
        ({"meter": "api_calls", "window": "week"}, "query.window", "Input should be"),
        (
            {"meter": "api_calls", "from": "2026-11-01T00:00:00"},
            "query.from",
            "must carry a UTC offset",
        ),
        ({"meter": "api_calls", "from": "yesterday"}, "query.from", "RFC 3339 date-time"),
        ({"meter": "api_calls", "from": "1796000000"}, "query.from", "RFC 3339 date-time"),
        ({"meter": "api_calls", "to": "1796000000000"}, "query.to", "RFC 3339 date-time"),
        ({"meter": "api_calls", "to": "2026-11-01"}, "query.to", "RFC 3339 date-time"),
        ({"meter": "api_calls", "to": "2026-11-01T25:00:00Z"}, "query.to", "valid datetime"),
        (
            {"meter": "api_calls", "from": "2026-11-21T00:00:00Z", "to": "2026-11-20T00:00:00Z"},
            "query.from",
            "must be before `to`",
        ),
        (
            {"meter": "api_calls", "window": "minute", "from": "2026-01-01T00:00:00Z"},
            "query.from",
            "kept for 3 hours",
        ),
        (
            {"meter": "api_calls", "window": "day", "from": "2010-01-01T00:00:00Z"},
            "query.from",
            "more than 2000 days",
        ),
        (
            {"meter": "api_calls", "window": "minute", "to": "9999-01-01T00:00:00Z"},
            "query.to",
            "must lie between 1970 and 2999",
        ),
        (
            {"meter": "api_calls", "from": "0001-01-01T00:00:00+01:00"},
            "query.from",
            "must lie between",
        ),
        (
            {"meter": "api_calls", "group_by": "method"},
            "query.group_by",
            "no group 'method'; its groups: endpoint",
        ),
        ({"meter": "storage_gb", "group_by": "endpoint"}, "query.group_by", "its groups: (none)"),
        ({"meter": "api_calls", "order_by": "value"}, "query.order_by", "needs group_by"),
        (
            {"meter": "api_calls", "group_by": "endpoint", "order_by": "-value"},
            "query.order_by",
            "must be 'value'",
        ),
        (
            {"meter": "api_calls", "group_by": "endpoint", "order_by": "value", "limit": "0"},
            "query.limit",
            "from 1 to 1000",
        ),
        (
            {"meter": "api_calls", "group_by": "endpoint", "order_by": "value", "limit": "1001"},
            "query.limit",
            "from 1 to 1000",
        ),
        (
            {"meter": "api_calls", "group_by": "endpoint", "order_by": "value", "limit": "5x"},
            "query.limit",
            "whole number",
        ),
        (
            {
                "meter": "api_calls",
                "group_by": "endpoint",
                "order_by": "value",
                "limit": "9" * 5000,
            },
            "query.limit",
            "whole number",
        ),
        (
            {"meter": "api_calls", "group_by": "endpoint", "limit": "5"},
            "query.limit",
            "only with order_by",
        ),
        ({"meter": "api_calls", "tz": "Mars/Olympus_Mons"}, "query.tz", "unknown time zone"),
        ({"meter": "api_calls", "tz": "../../etc/passwd"}, "query.tz", "unknown time zone"),
        ({"meter": "api_calls", "tz": "Asia/Kolkata"}, "query.tz", "UTC+05:30"),
        (
            {"meter": "api_calls", "tz": "Asia/Kolkata", "window": "hour"},
            "query.tz",
            "whole number",
        ),
        ({"meter": "active_users", "tz": "Europe/Paris"}, "query.tz", "UTC only"),
        ({"meter": "api_calls", "groupby": "endpoint"}, "query.groupby", "Extra inputs"),
        ({"meter": ["api_calls", "tokens"]}, "query.meter", "more than once"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(
    api: httpx.AsyncClient, params: dict[str, str | list[str]], field: str, reason: str
) -> None:
    response = await api.get("/v1/customers/acme/usage", params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "https://tally.dev/problems/invalid-parameter"
    [error] = response.json()["errors"]
    assert error["field"] == field and reason in error["reason"]


async def test_a_caller_without_a_key_learns_that_before_what_its_query_lacks(
    api: httpx.AsyncClient,
) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer tally_live_nope"}):
        response = await api.get(
            "/v1/customers/{acme}/usage", params={"limit": "abc"}, headers=headers
        )
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/problem+json"


async def test_the_last_hour_of_2999_may_be_read(api: httpx.AsyncClient) -> None:
    params = {"meter": "api_calls", "window": "month", "to": "2999-12-31T23:00:00Z"}
    response = await api.get("/v1/customers/acme/usage", params=params)
    assert response.status_code == 200, response.text
    assert {p["value"] for p in response.json()["data"]} == {"0"}


async def test_a_malformed_customer_id_is_422(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/customers/{acme}/usage", params={"meter": "api_calls"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "path.customer"


async def test_top_groups_of_the_live_counters(
    api: httpx.AsyncClient,
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    meters: dict[str, list[Meter]],
    tenant: str,
) -> None:
    customer = f"{tenant}-top"
    now = utcnow().replace(second=30)
    counts = {"/a": (2, 1), "/b": (1, 4), "/c": (1, 0), "/d": (0, 2)}  # 2 min ago, now
    events = [
        call(customer, "api_call", f"{e}-{m}-{n}", now - timedelta(minutes=2 - 2 * m), endpoint=e)
        for e, per_minute in counts.items()
        for m, count in enumerate(per_minute)
        for n in range(count)
    ]
    await aggregate(settings, ch, redis, meters, events)
    start = (now - timedelta(minutes=3)).replace(second=0, microsecond=0)
    params = {"meter": "api_calls", "window": "minute", "group_by": "endpoint"}
    body = await usage(
        api, customer, order_by="value", limit="2", **params, **{"from": start.isoformat()}
    )
    assert body["totals"] == [
        {"groups": {"endpoint": "/b"}, "value": "5"},
        {"groups": {"endpoint": "/a"}, "value": "3"},
    ]
    shown = [(p["start"], p["groups"]["endpoint"], p["value"]) for p in body["data"]]
    earlier, latest = sorted({p["start"] for p in body["data"]})
    assert shown == [
        (earlier, "/b", "1"),
        (earlier, "/a", "2"),
        (latest, "/b", "4"),
        (latest, "/a", "1"),
    ]
    everything = await usage(
        api, customer, order_by="value", **params, **{"from": start.isoformat()}
    )
    assert [t["groups"]["endpoint"] for t in everything["totals"]] == ["/b", "/a", "/d", "/c"]
    unranked = await usage(api, customer, **params, **{"from": start.isoformat()})
    assert "totals" not in unranked and len(unranked["data"]) == 6


async def test_top_groups_over_a_month_of_rollups(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-month"
    first = (utcnow() - timedelta(days=90)).date()
    rows = [
        (customer, first + timedelta(days=d), f'["/e{e}"]', (e + 1) * (d + 1))
        for d in range(30)
        for e in range(8)
    ]
    async with pool.connection() as conn, conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO usage_daily (customer, meter, day, group_key, value, watermark)"
            " VALUES (%s, 'api_calls', %s, %s, %s, now())",
            rows,
        )
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    body = await usage(
        api,
        customer,
        meter="api_calls",
        group_by="endpoint",
        order_by="value",
        limit="3",
        **{"from": start.isoformat(), "to": (start + timedelta(days=30)).isoformat()},
    )
    days = 30 * 31 // 2  # each endpoint's value is (e + 1) x the day's number
    assert body["totals"] == [
        {"groups": {"endpoint": f"/e{e}"}, "value": str((e + 1) * days)} for e in (7, 6, 5)
    ]
    assert len(body["data"]) == 3 * 30
    assert [p["groups"]["endpoint"] for p in body["data"][:3]] == ["/e7", "/e6", "/e5"]


async def test_a_top_over_live_and_rolled_up_days_counts_both(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, redis: Redis, tenant: str
) -> None:
    """Redis ranks only the days it holds: /mid is second there, first once the days
    Redis has lost (a flush) are read from the rollups, and its days in Redis must count
    too."""
    customer = f"{tenant}-mixed"
    today = datetime.combine(utcnow().date(), datetime.min.time(), UTC)
    for ago in range(10):  # live: /new 10 a day, /mid 9
        key = redis_keys.counters(
            customer, "api_calls", Window.DAY, bucket_id(Window.DAY, today - timedelta(days=ago))
        )
        await redis.hset(key, mapping={'["/new"]': 10 * VALUE_SCALE, '["/mid"]': 9 * VALUE_SCALE})
    old = [(today - timedelta(days=ago)).date() for ago in range(20, 25)]  # live, lost
    async with pool.connection() as conn, conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO usage_daily (customer, meter, day, group_key, value, watermark)"
            " VALUES (%s, 'api_calls', %s, '[\"/mid\"]', 100, now())",
            [(customer, day) for day in old],
        )
    since = {"from": (today - timedelta(days=30)).isoformat()}
    body = await usage(
        api, customer, meter="api_calls", group_by="endpoint", order_by="value", limit="1", **since
    )
    assert body["totals"] == [{"groups": {"endpoint": "/mid"}, "value": str(9 * 10 + 100 * 5)}]


async def _add_meter(conn: Any, name: str, group_by: list[str]) -> None:
    await conn.execute(
        "INSERT INTO meters (name, event_type, aggregation, group_by) VALUES (%s, %s, 'sum', %s)"
        " ON CONFLICT (name) DO UPDATE SET group_by = excluded.group_by",
        (name, f"{name}_event", group_by),
    )


async def _within(seconds: float, seen: Callable[[], Any]) -> float:
    """How long until ``seen()`` (awaited) is true; fails after ``seconds``."""
    began = time.monotonic()
    while not await seen():
        assert time.monotonic() - began < seconds, "not seen in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def test_a_meter_added_or_changed_is_served_without_a_restart(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, meter_cache: MeterCache, tenant: str
) -> None:
    """The api's cache reloads only every 600 s: seeing the change within seconds is
    PostgreSQL's notification at work."""
    name = f"m_{tenant}"

    async def listening() -> bool:
        return meter_cache.listening

    await _within(5, listening)  # its first load is done: from now on, only notifications
    asked = {"meter": name, "window": "minute"}
    unknown = await api.get("/v1/customers/acme/usage", params=asked)
    assert unknown.status_code == 422 and "unknown meter" in unknown.text

    async def served(**params: str) -> bool:
        reply = await api.get("/v1/customers/acme/usage", params=asked | params)
        return reply.status_code == 200

    try:
        async with pool.connection() as conn:
            await _add_meter(conn, name, ["region"])
        await _within(5, served)
        async with pool.connection() as conn:
            await _add_meter(conn, name, ["region", "zone"])
        await _within(5, lambda: served(group_by="region,zone"))
    finally:
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM meters WHERE name = %s", (name,))


async def test_a_missed_notification_is_caught_within_the_max_age(
    pool: AsyncConnectionPool, database_url: str, meter_cache: MeterCache, tenant: str
) -> None:
    """A change made with triggers off sends no notification: the cache reloading every
    0.5 s sees it, the one waiting 600 s for a notification does not."""
    name = f"m_{tenant}"
    safety_net = MeterCache(pool, database_url, max_age=0.5)
    await safety_net.start()

    async def listening() -> bool:
        return meter_cache.listening

    await _within(5, listening)  # its first load is done: from now on, only notifications
    try:
        async with pool.connection() as conn:
            await conn.execute("SET session_replication_role = replica")  # no triggers
            await _add_meter(conn, name, [])
            await conn.commit()
            await conn.execute("RESET session_replication_role")

        async def seen() -> bool:
            return name in (await safety_net.meters()).by_name

        assert await _within(3, seen) <= 1.5
        assert name not in (await meter_cache.meters()).by_name
    finally:
        await safety_net.stop()
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM meters WHERE name = %s", (name,))


async def test_reads_take_no_postgresql_connection_per_request(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, tenant: str
) -> None:
    """Live windows come from Redis and the meters from the cache: a hundred reads, and
    the unknown meters and meter lists among them, ask the pool for nothing."""
    params = {"meter": "api_calls", "window": "minute", "group_by": "endpoint"}
    await usage(api, f"{tenant}-q", **params)  # anything lazy is done
    before = pool.get_stats().get("requests_num", 0)
    for n in range(100):
        if n % 10 == 0:
            assert (await api.get("/v1/meters")).status_code == 200
            bad = await api.get(f"/v1/customers/{tenant}-q/usage", params={"meter": f"no{n}"})
            assert bad.status_code == 422
        await usage(api, f"{tenant}-q", order_by="value", limit="5", **params)
    assert pool.get_stats().get("requests_num", 0) == before


async def test_some_of_a_meters_groups_are_merged_and_ranked(
    api: httpx.AsyncClient,
    pool: AsyncConnectionPool,
    meter_cache: MeterCache,
    redis: Redis,
    tenant: str,
) -> None:
    """``group_by`` names some of a meter's dimensions: the others are merged, so the top
    models of a meter grouped by model and region is one call."""
    meter = Meter(
        name=f"tokens_{uuid.uuid4().hex[:8]}",
        event_type="llm_call",
        aggregation=Aggregation.SUM,
        value_property="$.tokens",
        group_by=("$.model", "$.region"),
    )
    async with pool.connection() as conn:
        await meter_store.save(conn, meter, "test", None)
    await meter_cache.refresh()
    customer, now = f"{tenant}-regions", utcnow()
    key = redis_keys.counters(customer, meter.name, Window.DAY, bucket_id(Window.DAY, now))
    counts = {("gpt", "eu"): 10, ("gpt", "us"): 20, ("claude", "eu"): 25, ("mini", "us"): 1}
    for group, tokens in counts.items():
        await redis.hincrby(key, redis_keys.group_field(group), tokens * 1_000_000)
    await redis.hincrby(key, redis_keys.TOTAL, 56 * 1_000_000)
    await redis.expire(key, 86400)
    since = {"from": (now - timedelta(hours=1)).isoformat()}
    body = await usage(
        api, customer, meter=meter.name, group_by="model", order_by="value", limit="2", **since
    )
    assert body["group_by"] == ["model"]
    assert body["totals"] == [
        {"groups": {"model": "gpt"}, "value": "30"},
        {"groups": {"model": "claude"}, "value": "25"},
    ]
    by_region = await usage(api, customer, meter=meter.name, group_by="region", **since)
    assert {p["groups"]["region"]: p["value"] for p in by_region["data"]} == {
        "eu": "35",
        "us": "21",
    }
    both = await usage(api, customer, meter=meter.name, group_by="region,model", **since)
    assert len(both["data"]) == 4 and both["group_by"] == ["model", "region"]
