"""``POST /v1/events`` against a real Kafka-protocol broker: every answer, good and bad."""

from __future__ import annotations

import gc
import gzip
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, cast

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import envelope, topics
from schemas.api_keys import Scope
from schemas.events import utcnow
from services.api.accounts import store as accounts
from services.common import bodies, catalog, kafka
from services.common.auth import Authenticator
from services.common.problems import Problem
from services.common.settings import Settings
from services.ingest import parsing
from services.ingest.app import Ingest, router
from services.ingest.publisher import Publisher
from services.runtime import Component, http_app
from tests.http_support import arriving

BATCH = "application/cloudevents-batch+json"
SINGLE = "application/cloudevents+json"


def event(tenant: str, **changes: Any) -> dict[str, Any]:
    body = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "billing-tests",
        "type": "api_call",
        "subject": f"{tenant}-acme",
        "time": utcnow().isoformat(),
        "data": {"endpoint": "/v1/search", "status": 200},
    }
    return body | changes


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool
) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings.model_copy(update={"max_batch_events": 50, "max_body_bytes": 16 * 1024})
    producer = await kafka.start_producer(settings.kafka_bootstrap_servers or "")
    ingest = Ingest(settings, Publisher(producer), Authenticator(settings, redis, pool))
    app = http_app([Component("ingest", [router(ingest)])])
    headers = {"Authorization": "Bearer test-token"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://tally", headers=headers
    ) as http:
        yield http
    await producer.stop()


async def post(client: httpx.AsyncClient, body: Any, kind: str = BATCH) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post("/v1/events", content=content, headers={"Content-Type": kind})


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"].startswith("https://tally.dev/problems/")
    return body


async def test_single_event_is_accepted_and_lands_in_kafka(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    sent = event(tenant, data={"value": "0.000001", "endpoint": "/v1/x"})
    response = await post(client, sent, SINGLE)
    assert response.status_code == 202
    assert response.json()["results"] == [{"index": 0, "status": "accepted", "id": sent["id"]}]
    stored = await _find_in_topic(settings, topics.EVENTS, sent["id"])
    assert stored is not None
    [copy] = [e for e in envelope.decode(stored) if e.id == sent["id"]]
    assert str(copy.value) == "0.000001" and copy.customer == sent["subject"]


async def test_batch_accepts_valid_events_and_reports_each_rejection(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    good, repeat = event(tenant), None
    repeat = dict(good)
    batch: list[Any] = [
        good,
        event(tenant, data={"value": "lots"}),
        event(tenant, time=(utcnow() + timedelta(minutes=10)).isoformat()),
        event(tenant, time=(utcnow() - timedelta(days=36)).isoformat()),
        {k: v for k, v in event(tenant).items() if k != "subject"},
        repeat,
        event(tenant, time="2026-11-21T10:00:00"),
        "not an object",
    ]
    response = await post(client, batch)
    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 1, 6)
    reasons = {r["index"]: r.get("errors", [{}])[0] for r in body["results"]}
    assert body["results"][0]["status"] == "accepted"
    assert reasons[1]["field"] == "data.value"
    assert reasons[1]["reason"].startswith("must be a number as JSON writes one")
    assert reasons[2] == {"field": "time", "reason": "is more than 300 s in the future"}
    assert reasons[3] == {"field": "time", "reason": "is older than the 35-day backfill window"}
    assert reasons[4] == {"field": "subject", "reason": "Field required"}
    assert body["results"][5]["status"] == "duplicate"
    assert reasons[6]["field"] == "time" and "timezone" in reasons[6]["reason"]
    assert reasons[7] == {"field": "", "reason": "must be a JSON object"}
    dead = await _find_in_topic(settings, topics.DEAD_LETTERS, batch[1]["id"])
    assert dead is not None
    letter = orjson.loads(dead)
    assert letter["errors"] == [reasons[1]] and letter["event"]["id"] == batch[1]["id"]


async def test_prefer_return_minimal_lists_only_what_was_not_accepted(
    client: httpx.AsyncClient, tenant: str
) -> None:
    good = event(tenant)
    batch = [good, event(tenant), dict(good), event(tenant, data={"value": "lots"})]
    headers = {"Content-Type": BATCH, "Prefer": "respond-async, return=minimal"}
    response = await client.post("/v1/events", content=orjson.dumps(batch), headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["preference-applied"] == "return=minimal"
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 1, 1)
    assert [(r["index"], r["status"]) for r in body["results"]] == [
        (2, "duplicate"),
        (3, "rejected"),
    ]
    assert body["results"][1]["errors"][0]["field"] == "data.value"
    # any other preference: the whole answer, one result per event
    other = await client.post(
        "/v1/events",
        content=orjson.dumps([event(tenant)]),
        headers={"Content-Type": BATCH, "Prefer": "return=representation"},
    )
    assert "preference-applied" not in other.headers
    assert [r["status"] for r in other.json()["results"]] == ["accepted"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1.0000001", "Decimal input should have no more than 6 decimal places"),
        (-1, "Input should be greater than or equal to 0"),
        (True, "Decimal input should be an integer, float, string or Decimal object"),
        ("NaN", "Input should be a finite number"),
        (10**12, "Input should be less than 1000000000000"),
    ],
)
async def test_bad_values_are_rejected_with_the_reason(
    client: httpx.AsyncClient, tenant: str, value: Any, reason: str
) -> None:
    body = problem(await post(client, event(tenant, data={"value": value}), SINGLE), 422)
    assert body["results"][0]["errors"] == [{"field": "data.value", "reason": reason}]
    assert body["detail"] == f"event 0: data.value {reason}"


async def test_all_invalid_is_422_naming_the_fields(client: httpx.AsyncClient, tenant: str) -> None:
    body = problem(await post(client, [event(tenant, specversion="0.3")]), 422)
    assert body["rejected"] == 1
    assert body["results"][0]["errors"][0]["field"] == "specversion"


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b'[{"id": ', "body is not valid JSON"),
        (b"", "the request body is empty"),
        (b"[]", "the batch holds no events"),
        (b'{"a": 1}', "must hold a JSON array of events"),
    ],
)
async def test_malformed_bodies_are_400(
    client: httpx.AsyncClient, payload: bytes, detail: str
) -> None:
    body = problem(await post(client, payload), 400)
    assert detail in body["detail"]
    assert body["errors"] == [{"field": "body", "reason": body["detail"]}]


async def test_a_batch_over_the_count_limit_is_413(client: httpx.AsyncClient, tenant: str) -> None:
    body = problem(await post(client, [event(tenant) for _ in range(51)]), 413)
    assert body["detail"] == "the batch holds 51 events; the limit is 50 per request"


async def test_a_body_over_the_size_limit_is_413(client: httpx.AsyncClient, tenant: str) -> None:
    big = [event(tenant, data={"note": "x" * 250, "more": "y" * 250}) for _ in range(40)]
    body = problem(await post(client, big), 413)
    assert "the limit is 16384 bytes" in body["detail"]


async def test_unknown_content_type_is_415(client: httpx.AsyncClient, tenant: str) -> None:
    body = problem(await post(client, [event(tenant)], "text/plain"), 415)
    assert "application/cloudevents-batch+json" in body["detail"]


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "send a service token or API key"),
        ("Bearer wrong", "not a valid service token"),
        ("Basic dGVzdA==", "send a service token or API key"),
        ("Bearer tally_live_" + "A" * 49, "checksum"),
    ],
)
async def test_missing_or_wrong_token_is_401(
    client: httpx.AsyncClient, tenant: str, authorization: str | None, detail: str
) -> None:
    headers = {"Content-Type": BATCH}
    if authorization:
        headers["Authorization"] = authorization
    client.headers.pop("Authorization")
    response = await client.post(
        "/v1/events", content=orjson.dumps([event(tenant)]), headers=headers
    )
    assert detail in problem(response, 401)["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


async def test_kafka_failure_is_503_and_reports_nothing_accepted(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool, tenant: str
) -> None:
    producer = await kafka.start_producer(settings.kafka_bootstrap_servers or "")
    ingest = Ingest(settings, Publisher(producer), Authenticator(settings, redis, pool))
    app = http_app([Component("ingest", [router(ingest)])])
    await producer.stop()  # the broker connection is gone
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        response = await http.post(
            "/v1/events",
            content=orjson.dumps([event(tenant)]),
            headers={"Content-Type": BATCH, "Authorization": "Bearer test-token"},
        )
    body = problem(response, 503)
    assert "none is reported accepted" in body["detail"] and response.headers["retry-after"] == "1"


async def _find_in_topic(settings: Settings, topic: str, needle: str) -> bytes | None:
    """The first record of ``topic`` whose value mentions ``needle``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    if record.value and needle.encode() in record.value:
                        return bytes(record.value)
    finally:
        await consumer.stop()
    return None


CONTROLS = ["\x00", "\x1f", "\x7f", "\x85"]


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("id", lambda c: {"id": f"evt{c}1"}),
        ("source", lambda c: {"source": f"gw{c}"}),
        ("type", lambda c: {"type": f"api_call{c}"}),
        ("subject", lambda c: {"subject": f"acme{c}"}),
        ("data.endpoint", lambda c: {"endpoint": f"/v1/{c}x"}),
        ("data", lambda c: {f"end{c}point": "/v1/x"}),
    ],
)
async def test_control_characters_are_rejected_by_field_and_dead_lettered(
    client: httpx.AsyncClient, settings: Settings, tenant: str, field: str, change, control: str
) -> None:
    """A control character in an id, source, type, subject or dimension (name or value)
    rejects that event alone, naming the field and the character; its batch keeps the
    valid events, and the rejected one goes to the dead-letter topic."""
    trace = uuid.uuid4().hex
    bad = event(tenant, data={"endpoint": "/v1/x", "trace": trace})
    changed = change(control)
    if field.startswith("data"):
        bad["data"] = {"trace": trace} | changed
    else:
        bad |= changed
    body = (await post(client, [event(tenant), bad])).json()
    assert (body["accepted"], body["rejected"]) == (1, 1), body
    [error] = body["results"][1]["errors"]
    assert error["field"] == field
    assert "must not contain control characters" in error["reason"]
    assert f"found U+{ord(control):04X}" in error["reason"]
    letter = await _find_in_topic(settings, topics.DEAD_LETTERS, trace)
    assert letter is not None and orjson.loads(letter)["errors"] == [error]


async def test_an_integer_beyond_64_bits_is_dead_lettered(
    client: httpx.AsyncClient, settings: Settings, tenant: str
) -> None:
    """orjson cannot write such an integer; the dead letter still goes out, whole."""
    trace = uuid.uuid4().hex
    bad = event(tenant, data={"value": 10**30, "trace": trace})
    body = (await post(client, json.dumps([event(tenant), bad]).encode())).json()
    assert (body["accepted"], body["rejected"]) == (1, 1), body
    letter = await _find_in_topic(settings, topics.DEAD_LETTERS, trace)
    assert letter is not None and json.loads(letter)["event"]["data"]["value"] == 10**30


async def test_an_event_rejected_for_its_time_does_not_shadow_a_valid_retry(
    client: httpx.AsyncClient, tenant: str
) -> None:
    stale = event(tenant, time=(utcnow() - timedelta(days=40)).isoformat())
    fixed = stale | {"time": utcnow().isoformat()}
    body = (await post(client, [stale, fixed])).json()
    assert [r["status"] for r in body["results"]] == ["rejected", "accepted"]


async def test_times_beyond_the_calendar_are_rejected_not_a_500(
    client: httpx.AsyncClient, tenant: str
) -> None:
    body = problem(await post(client, [event(tenant, time="0001-01-01T00:30:00+01:00")]), 422)
    assert body["results"][0]["errors"][0]["field"] == "time"


async def test_an_event_time_given_as_a_number_is_refused_not_guessed(
    client: httpx.AsyncClient, tenant: str
) -> None:
    """Seconds or milliseconds since 1970, a number or digits in a string: pydantic would
    guess which by size and count the event in whatever month that lands on."""
    late = [event(tenant, time=1796000000), event(tenant, time="1796000000000")]
    response = await post(client, [*late, event(tenant)])
    assert response.status_code == 202
    body = response.json()
    assert [r["status"] for r in body["results"]] == ["rejected", "rejected", "accepted"]
    reason = "must be an RFC 3339 date-time, e.g. 2026-11-01T00:00:00Z"
    assert [r["errors"] for r in body["results"][:2]] == [[{"field": "time", "reason": reason}]] * 2


async def test_a_batch_that_stalls_mid_body_is_a_408(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest reads its own bodies (gzip, 10 MiB): the same bound in time holds there."""
    monkeypatch.setattr(bodies, "BODY_SECONDS", 0.05)
    ingest = Ingest(settings, cast(Publisher, None), cast(Authenticator, None))
    with pytest.raises(Problem) as info:
        await ingest.read_body(arriving([b'[{"specversion": "1.0", ']))
    assert (info.value.status, info.value.kind.slug) == (408, "request-timeout")


async def test_a_gzipped_batch_is_accepted(client: httpx.AsyncClient, tenant: str) -> None:
    body = gzip.compress(orjson.dumps([event(tenant) for _ in range(20)]))
    response = await client.post(
        "/v1/events", content=body, headers={"Content-Type": BATCH, "Content-Encoding": "gzip"}
    )
    assert response.status_code == 202 and response.json()["accepted"] == 20


@pytest.mark.parametrize(
    ("content", "encoding", "status", "detail"),
    [
        (b"not gzip at all", "gzip", 400, "not valid gzip"),
        (gzip.compress(b"[]" * 100)[:20], "gzip", 400, "ends early"),
        (gzip.compress(b"[]") + gzip.compress(b"[]"), "gzip", 400, "data follows the gzip"),
        (gzip.compress(b" " * 200_000), "gzip", 413, "the limit is 16384 bytes"),
        (b"[]", "br", 415, "Content-Encoding 'br' is not accepted"),
    ],
)
async def test_bad_or_oversized_compressed_bodies(
    client: httpx.AsyncClient, content: bytes, encoding: str, status: int, detail: str
) -> None:
    response = await client.post(
        "/v1/events", content=content, headers={"Content-Type": BATCH, "Content-Encoding": encoding}
    )
    assert detail in problem(response, status)["detail"]


async def test_a_customer_key_emits_for_its_own_customer_only(
    client: httpx.AsyncClient, settings: Settings, pool: AsyncConnectionPool, tenant: str
) -> None:
    async with pool.connection() as conn:
        plan = await catalog.read_plan(conn, "pro")
        assert plan is not None
        customer = await accounts.create_customer(
            conn,
            email=f"{tenant}@example.com",
            company="",
            plan=plan,
            actor="test",
            customer_id=f"{tenant}-acme",
        )
        _, key = await accounts.issue_key(conn, customer.id, settings.pepper, "test")
        reader, read_only = await accounts.issue_key(
            conn, customer.id, settings.pepper, "test", scopes=[Scope.USAGE_READ]
        )
    client.headers["Authorization"] = f"Bearer {key}"
    mine, theirs = event(tenant), event(tenant, subject=f"{tenant}-other")
    body = (await post(client, [mine, theirs])).json()
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected"]
    assert body["results"][1]["errors"][0]["field"] == "subject"
    client.headers["Authorization"] = f"Bearer {read_only}"
    assert "ingest" in problem(await post(client, [mine]), 403)["detail"]
    async with pool.connection() as conn:
        await accounts.revoke_key(conn, reader, "test")
    assert "revoked" in problem(await post(client, [mine]), 401)["detail"]


async def test_a_batch_is_judged_with_the_collector_paused_and_it_comes_back_on(
    client: httpx.AsyncClient, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Collections during a batch walk the whole live batch and free nothing
    (``services.common.collector``); after the request, accepted or refused, collection
    is on again."""
    judge = parsing.judge
    judged_with: list[bool] = []

    async def watched(*args: Any, **kwargs: Any) -> list[parsing.Verdict]:
        judged_with.append(gc.isenabled())
        return await judge(*args, **kwargs)

    monkeypatch.setattr(parsing, "judge", watched)
    assert gc.isenabled()
    accepted = await post(client, [event(tenant), event(tenant, time="yesterday")])
    assert accepted.status_code == 202 and judged_with == [False]
    assert gc.isenabled()
    problem(await post(client, b"[{", BATCH), 400)
    problem(await post(client, [event(tenant, time="yesterday")]), 422)
    assert judged_with == [False, False] and gc.isenabled()
