"""The emitters people already have, against a real ingest and Kafka-protocol broker:
CloudEvents binary mode and ``data_base64`` (the ``cloudevents`` SDK), and Lago's event
API (``lago-python-client``, over real HTTP)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from lago_python_client.client import Client
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models import BatchEvent, Event
from openmeter import Client as OpenMeter
from openmeter.models import Event as OpenMeterEvent
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import envelope, topics
from schemas.events import utcnow
from services.common import kafka
from services.common.auth import Authenticator
from services.common.meter_cache import MeterCache
from services.common.settings import Settings
from services.ingest import emitters
from services.ingest.app import Ingest, router
from services.ingest.publisher import Publisher
from services.runtime import Component, http_app
from tests.http_support import serving
from tests.integration.test_ingest_http import _find_in_topic, problem

TOKEN = "test-token"


@pytest.fixture
async def app(settings: Settings, redis: Redis, pool: AsyncConnectionPool) -> AsyncIterator[Any]:
    settings = settings.model_copy(update={"max_batch_events": 500})
    producer = await kafka.start_producer(settings.kafka_bootstrap_servers or "")
    meters = MeterCache(pool, settings.database_url, max_age=60)
    await meters.start()
    ingest = Ingest(
        settings, Publisher(producer), Authenticator(settings, redis, pool), None, meters
    )
    yield http_app([Component("ingest", [router(ingest), emitters.router(ingest)])])
    await meters.stop()
    await producer.stop()


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://tally", headers=headers
    ) as http:
        yield http


@pytest.fixture
async def served(app: Any) -> AsyncIterator[str]:
    """Ingest behind a real HTTP server, for clients that bring their own transport."""
    async with serving(app) as url:
        yield url


def cloudevent(tenant: str, data: Any, **attributes: Any) -> CloudEvent:
    base = {"source": "ce-sdk", "type": "api_call", "subject": f"{tenant}-acme"}
    base |= {"time": utcnow().isoformat(), "datacontenttype": "application/json"}
    return CloudEvent(base | attributes, data)


async def stored(settings: Settings, ident: str) -> envelope.StoredEvent:
    record = await _find_in_topic(settings, topics.EVENTS, ident)
    assert record is not None, f"{ident} is not in {topics.EVENTS}"
    [found] = [e for e in envelope.decode(record) if e.id == ident]
    return found


# CloudEvents binary mode and data_base64


async def test_binary_mode_from_the_sdk_is_accepted_with_its_data(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    sent = cloudevent(tenant, {"value": "2.5", "endpoint": "/v1/x"}, tallyignored="yes")
    headers, body = to_binary(sent)
    response = await client.post("/v1/events", headers=headers, content=body)
    assert response.status_code == 202, response.text
    copy = await stored(settings, sent["id"])
    assert (copy.value, copy.customer, copy.source) == (Decimal("2.5"), f"{tenant}-acme", "ce-sdk")
    assert copy.dimensions == {"endpoint": "/v1/x"}


async def test_binary_mode_without_a_required_attribute_names_its_header(
    client: httpx.AsyncClient, tenant: str
) -> None:
    headers, body = to_binary(cloudevent(tenant, {"value": 1}))
    del headers["ce-subject"]
    body_ = problem(await client.post("/v1/events", headers=headers, content=body), 422)
    assert body_["results"][0]["errors"] == [{"field": "ce-subject", "reason": "Field required"}]


async def test_binary_mode_refuses_an_attribute_that_is_not_utf_8_or_given_twice(
    client: httpx.AsyncClient, tenant: str
) -> None:
    """Decoded with replacement, ``%FE`` and ``%FF`` would both read as U+FFFD: two ids
    would become one and the second event would be dropped as a duplicate of the first."""
    headers, body = to_binary(cloudevent(tenant, {"value": 1}))
    for ident in ("evt%FE", "evt%FF", "evt%C0"):
        response = await client.post("/v1/events", headers=headers | {"ce-id": ident}, content=body)
        (error,) = problem(response, 422)["errors"]
        assert error["field"] == "ce-id"
        assert error["reason"].startswith("is not percent-encoded UTF-8")
    twice = [*headers.items(), ("ce-subject", f"{tenant}-other")]
    response = await client.post("/v1/events", headers=twice, content=body)
    reason = "is given twice; an attribute has one value"
    assert problem(response, 422)["errors"] == [{"field": "ce-subject", "reason": reason}]
    encoded = headers | {"ce-id": "evt%C3%A9%20%25"}
    response = await client.post("/v1/events", headers=encoded, content=body)
    assert response.status_code == 202, response.text
    assert response.json()["results"][0]["id"] == "evt\u00e9 %"


async def test_binary_mode_refuses_data_that_is_not_json(
    client: httpx.AsyncClient, tenant: str
) -> None:
    headers, _ = to_binary(cloudevent(tenant, {"value": 1}))
    headers["content-type"] = "text/plain"
    response = await client.post("/v1/events", headers=headers, content=b"1 call")
    assert "text/plain" in problem(response, 415)["detail"]
    headers["content-type"] = "application/json"
    response = await client.post("/v1/events", headers=headers, content=b"{not json")
    assert "not valid JSON" in problem(response, 400)["detail"]
    response = await client.post("/v1/events", headers=headers, content=b"[1, 2]")
    assert problem(response, 422)["results"][0]["errors"][0]["field"] == "data"


async def test_data_base64_in_structured_mode_is_decoded(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    sent = cloudevent(tenant, orjson.dumps({"value": 7, "region": "eu"}))
    headers, body = to_structured(sent)
    assert b"data_base64" in body
    response = await client.post("/v1/events", headers=headers, content=body)
    assert response.status_code == 202, response.text
    copy = await stored(settings, sent["id"])
    assert (copy.value, copy.dimensions) == (Decimal(7), {"region": "eu"})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"data": {"value": 1}}, "must not be sent together with data"),
        ({"datacontenttype": "text/plain"}, "only JSON data can be metered"),
        ({"data_base64": "%%%"}, "is not base64 of a JSON document"),
        ({"data_base64": base64.b64encode(b"not json").decode()}, "is not base64 of a JSON"),
        ({"data_base64": 12}, "must be a base64 string"),
    ],
)
async def test_bad_data_base64_is_rejected_naming_it(
    client: httpx.AsyncClient, tenant: str, change: dict[str, Any], reason: str
) -> None:
    headers, body = to_structured(cloudevent(tenant, b'{"value": 1}'))
    sent = orjson.loads(body) | change
    response = await client.post("/v1/events", headers=headers, content=orjson.dumps(sent))
    [error] = problem(response, 422)["results"][0]["errors"]
    assert error["field"] == "data_base64" and reason in error["reason"]


# Lago's event API


def lago_client(url: str) -> Client:
    return Client(api_key=TOKEN, api_url=url)


def lago_event(tenant: str, **changes: Any) -> Event:
    fields: dict[str, Any] = {
        "transaction_id": uuid.uuid4().hex,
        "external_subscription_id": f"{tenant}-sub",
        "code": "api_calls",
        "timestamp": int(utcnow().timestamp()),
        "properties": {"value": 3, "endpoint": "/v1/x"},
    }
    return Event(**(fields | changes))


async def test_lago_client_sends_one_event_that_reaches_the_meter(
    served: str, settings: Settings, tenant: str
) -> None:
    sent = lago_event(tenant, timestamp=str(utcnow().timestamp()))
    answer = await asyncio.to_thread(lago_client(served).events.create, sent)
    assert answer is not None and answer.transaction_id == sent.transaction_id
    assert answer.external_subscription_id == f"{tenant}-sub" and answer.code == "api_calls"
    copy = await stored(settings, sent.transaction_id)
    # code api_calls is the meter of that name, which counts events of type api_call
    assert (copy.source, copy.type, copy.customer) == ("lago", "api_call", f"{tenant}-sub")
    assert copy.value == 3 and copy.dimensions == {"endpoint": "/v1/x"}


async def test_lago_client_sends_a_batch(served: str, settings: Settings, tenant: str) -> None:
    events = [lago_event(tenant, code="storage"), lago_event(tenant, code="a_type_of_its_own")]
    await asyncio.to_thread(lago_client(served).events.batch_create, BatchEvent(events=events))
    assert (await stored(settings, events[0].transaction_id)).type == "storage"
    assert (await stored(settings, events[1].transaction_id)).type == "a_type_of_its_own"


async def test_lago_event_without_a_customer_is_lagos_422(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    event = lago_event(tenant).dict()
    del event["external_subscription_id"]
    response = await client.post("/api/v1/events", json={"event": event})
    assert response.status_code == 422
    assert response.json() == {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {"external_subscription_id": ["value_is_mandatory"]},
    }
    assert await _find_in_topic(settings, topics.DEAD_LETTERS, event["transaction_id"])


async def test_a_lago_batch_with_one_bad_event_is_refused_whole(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    good = lago_event(tenant).dict()
    bad = lago_event(tenant, timestamp="yesterday", properties={"value": "lots"}).dict()
    response = await client.post("/api/v1/events/batch", json={"events": [good, bad]})
    assert response.status_code == 422
    details = response.json()["error_details"]
    assert set(details) == {"1"} and set(details["1"]) == {"timestamp", "properties.value"}
    reason = "must be Unix seconds (a number or a numeric string) before the year 10000"
    assert details["1"]["timestamp"] == [reason]
    assert await _find_in_topic(settings, topics.EVENTS, good["transaction_id"]) is None


async def test_lago_external_customer_id_is_the_subject_and_named_in_errors(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    event = lago_event(tenant).dict() | {"external_customer_id": f"{tenant}-cust"}
    del event["timestamp"]  # absent: the time of receipt
    response = await client.post("/api/v1/events", json={"event": event})
    assert response.status_code == 200, response.text
    shown = response.json()["event"]
    # as Lago's serializer: ISO 8601 in UTC, the timestamp to the millisecond
    assert datetime.fromisoformat(shown["timestamp"]) <= utcnow()
    assert shown["timestamp"].endswith("Z") and len(shown["timestamp"]) == 24
    assert shown["created_at"].endswith("Z") and len(shown["created_at"]) == 20
    assert (await stored(settings, event["transaction_id"])).customer == f"{tenant}-cust"
    bad = event | {"transaction_id": uuid.uuid4().hex, "external_customer_id": "no spaces"}
    response = await client.post("/api/v1/events", json={"event": bad})
    assert list(response.json()["error_details"]) == ["external_customer_id"]


async def test_the_real_client_raises_on_lagos_422(served: str, tenant: str) -> None:
    with pytest.raises(LagoApiError) as raised:
        await asyncio.to_thread(lago_client(served).events.create, lago_event(tenant, code=""))
    assert raised.value.status_code == 422


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/v1/events", b"{}", "param is missing or the value is empty: event"),
        ("/api/v1/events/batch", b'{"events": []}', "value is empty: events"),
        ("/api/v1/events/batch", b'{"events": {"a": 1}}', "events must be an array"),
        ("/api/v1/events", b"{not json", "the body is not valid JSON"),
    ],
)
async def test_malformed_lago_requests_are_lagos_400(
    client: httpx.AsyncClient, path: str, body: bytes, error: str
) -> None:
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["status"] == 400
    assert error in response.json()["error"]


async def test_a_lago_batch_over_lagos_limit_is_refused(
    client: httpx.AsyncClient, tenant: str
) -> None:
    """Lago takes 100 events a batch (LAGO_EVENTS_BATCH_MAX_LENGTH), whatever Tally's own
    limit (here 500)."""
    events = [lago_event(tenant).dict() for _ in range(101)]
    response = await client.post("/api/v1/events/batch", json={"events": events})
    assert response.status_code == 422
    assert response.json()["error_details"] == {"events": ["too_many_events"]}


async def test_lago_needs_the_bearer_token(client: httpx.AsyncClient, tenant: str) -> None:
    body = {"event": lago_event(tenant).dict()}
    response = await client.post("/api/v1/events", json=body, headers={"Authorization": "x"})
    assert response.status_code == 401


# OpenMeter's ingest on the same path


async def test_cloudevents_on_the_openmeter_path_answer_204(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    headers, body = to_structured(cloudevent(tenant, {"value": 4}))
    response = await client.post("/api/v1/events", headers=headers, content=body)
    assert response.status_code == 204 and response.content == b""
    assert (await stored(settings, orjson.loads(body)["id"])).value == 4
    bad = orjson.loads(body) | {"id": uuid.uuid4().hex, "subject": "no spaces allowed"}
    response = await client.post("/api/v1/events", headers=headers, content=orjson.dumps(bad))
    refused = problem(response, 400)
    assert refused["type"] == "https://tally.dev/problems/events-refused"
    assert refused["results"][0]["errors"][0]["field"] == "subject"


async def test_one_invalid_event_refuses_an_openmeter_batch_whole(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    """As OpenMeter answers: 400, nothing of the request stored, the invalid event named;
    sent again without it, the good one is stored."""
    good = orjson.loads(to_structured(cloudevent(tenant, {"value": 3}))[1])
    bad = good | {"id": uuid.uuid4().hex, "data": {"value": 1, "deep": [[[[[[[[[1]]]]]]]]]}}
    batch = {"Content-Type": "application/cloudevents-batch+json"}
    response = await client.post("/api/v1/events", headers=batch, content=orjson.dumps([good, bad]))
    refused = problem(response, 400)
    assert [r["index"] for r in refused["results"]] == [1]
    assert refused["results"][0]["id"] == bad["id"]
    assert "event 1: data" in refused["detail"]
    response = await client.post("/api/v1/events", headers=batch, content=orjson.dumps([good]))
    assert response.status_code == 204
    assert (await stored(settings, good["id"])).value == 3


async def test_an_openmeter_event_without_time_happened_when_it_arrived(
    served: str, settings: Settings, tenant: str
) -> None:
    """OpenMeter's SDK may leave ``time`` out; OpenMeter stamps it at ingest, and so does
    Tally on OpenMeter's path."""
    client = OpenMeter(endpoint=served, token=TOKEN)
    event = OpenMeterEvent(
        id=uuid.uuid4().hex,
        source="openmeter-sdk",
        specversion="1.0",
        type="api_call",
        subject=f"{tenant}-acme",
        data={"value": 2},
    )
    before = utcnow()
    await asyncio.to_thread(client.events.ingest_event, event)
    found = await stored(settings, event.id)
    assert found.value == 2 and before <= found.time <= utcnow()


async def test_the_openmeter_sdk_ingests_one_event_a_batch_and_plain_json(
    served: str, settings: Settings, tenant: str
) -> None:
    client = OpenMeter(endpoint=served, token=TOKEN)

    def om_event(value: int) -> OpenMeterEvent:
        return OpenMeterEvent(
            id=uuid.uuid4().hex,
            source="openmeter-sdk",
            specversion="1.0",
            type="api_call",
            subject=f"{tenant}-acme",
            time=utcnow(),
            data={"value": value, "endpoint": "/v1/x"},
        )

    one, batch, plain = om_event(5), [om_event(6), om_event(7)], om_event(8)
    await asyncio.to_thread(client.events.ingest_event, one)  # each raises unless 204
    await asyncio.to_thread(client.events.ingest_events, batch)
    await asyncio.to_thread(client.events.ingest_events_json, plain)  # application/json
    assert (await stored(settings, one.id)).value == 5
    assert (await stored(settings, batch[1].id)).value == 7
    assert (await stored(settings, plain.id)).value == 8
