"""Nested event data at ingest: kept exactly, bounded, and refused when a meter cannot
read it — over real HTTP, into a real Kafka-protocol broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import envelope, topics
from schemas.events import utcnow
from services.common import kafka
from services.common.auth import Authenticator
from services.common.meter_cache import MeterCache
from services.common.settings import Settings
from services.ingest.app import Ingest, router
from services.ingest.publisher import Publisher
from services.runtime import Component, http_app
from tests.integration.test_ingest_http import BATCH, _find_in_topic


@pytest.fixture
async def meter_type(pool: AsyncConnectionPool, tenant: str) -> AsyncIterator[str]:
    """An event type read by a sum meter of ``$.tokens.input`` (and nothing else)."""
    kind, name = f"llm.{tenant}", f"in_{tenant}"
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO meters (name, description, event_type, aggregation, value_property,"
            " group_by, unit) VALUES (%s, '', %s, 'sum', '$.tokens.input', %s, 'tokens')",
            (name, kind, ["$.model"]),
        )
    yield kind
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM meters WHERE name = %s", (name,))


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool, meter_type: str
) -> AsyncIterator[httpx.AsyncClient]:
    producer = await kafka.start_producer(settings.kafka_bootstrap_servers or "")
    meters = MeterCache(pool, settings.database_url, max_age=60)
    await meters.start()
    await meters.refresh()
    ingest = Ingest(
        settings, Publisher(producer), Authenticator(settings, redis, pool), None, meters
    )
    app = http_app([Component("ingest", [router(ingest)])])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url="http://tally",
        headers={"Authorization": "Bearer test-token", "Content-Type": BATCH},
    ) as http:
        yield http
    await meters.stop()
    await producer.stop()


def llm_call(tenant: str, kind: str, data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "llm-gateway",
        "type": kind,
        "subject": f"{tenant}-acme",
        "time": utcnow().isoformat(),
        "data": data,
    }


async def test_nested_data_travels_exactly_to_the_aggregator(
    client: httpx.AsyncClient, settings: Settings, tenant: str, meter_type: str
) -> None:
    body = (
        b'[{"specversion": "1.0", "id": "nested-%s", "source": "llm-gateway", "type": "%s",'
        b' "subject": "%s-acme", "time": "%s", "data": {"model": "gpt-4o",'
        b' "tokens": {"input": 812, "output": 96, "cost": 0.000001234567890123},'
        b' "tools": ["search", "code"], "cached": false}}]'
        % (tenant.encode(), meter_type.encode(), tenant.encode(), utcnow().isoformat().encode())
    )
    response = await client.post("/v1/events", content=body)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 1
    stored = await _find_in_topic(settings, topics.EVENTS, f"nested-{tenant}")
    assert stored is not None
    [event] = [e for e in envelope.decode(stored) if e.id == f"nested-{tenant}"]
    assert event.dimensions == {"model": "gpt-4o"}
    data = event.parsed_data()
    assert data is not None
    assert data["tokens"] == {
        "input": 812,
        "output": 96,
        "cost": Decimal("0.000001234567890123"),
    }
    assert data["tools"] == ["search", "code"] and data["cached"] is False


async def test_an_event_a_meter_cannot_read_is_refused_and_its_batch_kept(
    client: httpx.AsyncClient, tenant: str, meter_type: str
) -> None:
    batch = [
        llm_call(tenant, meter_type, {"model": "a", "tokens": {"input": 5}}),
        llm_call(tenant, meter_type, {"model": "a", "tokens": {"output": 5}}),
        llm_call(tenant, meter_type, {"model": "a", "tokens": {"input": "many"}}),
        llm_call(tenant, meter_type, {"model": "a", "tokens": {"input": True}}),
        llm_call(tenant, "other.type", {"tokens": {"output": 5}}),
    ]
    response = await client.post("/v1/events", content=orjson.dumps(batch))
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (2, 3), body
    name = f"in_{tenant}"
    for index in (1, 2, 3):
        assert body["results"][index]["errors"] == [
            {
                "field": "data.tokens.input",
                "reason": f"meter {name} needs a number from 0 to 10^12 at $.tokens.input",
            }
        ]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"o": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}}, "nested deeper than 8"),
        ({"o": list(range(1001))}, "more than 1000 keys and values"),
        ({"o": {"k": "x" * 257}}, "o.k: strings are at most 256 characters"),
        ({"o": {"k\u0007": 1}}, "must not contain control characters"),
        (
            {"o": {"id": orjson.Fragment(b"18446744073709551616")}},
            "o.id: 18446744073709551616 is beyond 64-bit integers",
        ),
        (
            {"o": {"price": orjson.Fragment(b"0.12345678901234567")}},
            "o.price: 0.12345678901234567 has more digits than a 64-bit float holds",
        ),
    ],
)
async def test_nested_data_beyond_its_bounds_is_refused_by_field(
    client: httpx.AsyncClient, tenant: str, data: dict[str, Any], why: str
) -> None:
    sent = llm_call(tenant, "nested.bounds", data)
    response = await client.post("/v1/events", content=orjson.dumps([sent]))
    assert response.status_code == 422, response.text  # nothing in the request accepted
    [result] = response.json()["results"]
    assert result["status"] == "rejected"
    [error] = result["errors"]
    assert error["field"] == "data" and why in error["reason"], error
