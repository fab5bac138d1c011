"""``POST /v1/events``: CloudEvents in (structured, batched, or HTTP binary mode: see
``binary``), 202 once Kafka holds them.  ``emitters`` serves Lago's and OpenMeter's paths.

Answers:
- 202 with a per-event result when at least one event was accepted (or was a repeat
  within the request); rejected ones are listed with the field and reason, and copied
  to the dead-letter topic;
- 422 when every event was rejected; 400 for malformed JSON; 401 without a valid token
  (429 once an address keeps sending wrong ones); 413 over the size or count limit;
  415 for other content types; 503 when Kafka did not acknowledge within
  ``kafka_publish_timeout`` (5 s: a broker that is down never hangs a client). Nothing
  is then reported accepted, so the client's retry is safe: events that did get stored
  are dropped downstream as duplicates by (source, id).  503 ``overloaded`` with
  ``Retry-After`` while the aggregator is more than ``ingest_max_lag_seconds`` behind
  (``backpressure``): the body is not even read.  503 ``journal-unavailable`` when the
  write-ahead log, kept with the in-memory broker, could not store them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from schemas.api_keys import Scope
from schemas.envelope import Publishable
from schemas.events import UsageEvent, utcnow
from schemas.problem_types import (
    BROKER_UNAVAILABLE,
    INVALID_EVENTS,
    JOURNAL_UNAVAILABLE,
    MALFORMED_BODY,
    UNSUPPORTED_ENCODING,
)
from services.common import bodies, metrics
from services.common.auth import Authenticator
from services.common.bodies import arriving, check_declared, too_large
from services.common.collector import without_collection
from services.common.logging import get_logger
from services.common.meter_cache import MeterCache
from services.common.openapi import InvalidField, component_schemas, problem_responses, ref
from services.common.problems import Problem
from services.common.settings import Settings
from services.ingest import binary, parsing
from services.ingest.backpressure import Backpressure
from services.ingest.parsing import Status, TimeBounds
from services.ingest.publisher import Publisher
from services.ingest.readable import MeterChecks
from services.ingest.wal.journal import JournalError

log = get_logger("tally.ingest")
MINIMAL_APPLIED = {"Preference-Applied": "return=minimal"}
PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "example": "return=minimal"},
    "description": "`return=minimal` (RFC 7240): `results` lists only the events not accepted,"
    " and the answer carries `Preference-Applied: return=minimal`.",
}

BINARY_MODE = [
    {
        "name": f"ce-{name}",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": f"CloudEvents HTTP binary mode: the event's `{name}`; the body is then"
        " its `data` (a JSON object).  With `ce-specversion` present and a Content-Type other"
        " than a CloudEvents one, every attribute comes from `ce-*` headers.",
    }
    for name in ("specversion", "id", "source", "type", "subject", "time")
]


class EventResult(BaseModel):
    index: int = Field(description="The event's position in the request, from 0.")
    status: Literal["accepted", "duplicate", "rejected"]  # parsing.Status
    id: str | None = Field(None, description="The event's id, when it has one (absent if not).")
    errors: list[InvalidField] | None = Field(None, description="Why it was rejected.")


class IngestReceipt(BaseModel):
    """The 202 answer (also the extra members of the 422 when every event is rejected)."""

    request_id: str
    accepted: int
    duplicates: int = Field(description="Repeats of an earlier event of the same request.")
    rejected: int = Field(description="Copied to the dead-letter topic with their reasons.")
    results: list[EventResult] = Field(
        description="One per event, in order; with `Prefer: return=minimal`, only the events"
        " not accepted (duplicates and rejections), each with its index."
    )


class Ingest:
    """What the ingest route needs, built once per process."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        auth: Authenticator,
        guard: Backpressure | None = None,
        meters: MeterCache | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.bounds = TimeBounds(settings.future_tolerance, settings.backfill_window)
        self.auth = auth
        self.guard = guard  # refuses while the aggregator is too far behind
        self.meters = meters  # Lago's metric codes are meter names (services.ingest.lago)
        self._checks = MeterChecks()

    async def judge(
        self, raw_items: list[Any], received_at: datetime, subject: str | None
    ) -> list[parsing.Verdict]:
        """Every item's verdict (``parsing.judge``), refusing what a meter cannot read."""
        verdicts = await parsing.judge(raw_items, self.bounds, received_at, subject)
        if self.meters is not None:
            self._checks.refuse_unreadable(verdicts, self.meters.by_type())
        return verdicts

    @property
    def catalog_version(self) -> int:
        """The meter catalog version this process holds, stamped on what it publishes."""
        index = self.meters.current() if self.meters is not None else None
        return index.version if index is not None else 0

    async def authenticate(self, request: Request) -> str | None:
        """``None`` for a service token (any subject); for a customer's API key with
        the ``ingest`` scope, the customer its events must be about."""
        return (await self.auth.authorize(request, Scope.INGEST)).customer

    async def read_body(self, request: Request) -> bytes:
        """The body, decompressed when sent with ``Content-Encoding: gzip``; the size limit
        holds for what arrives and for what it inflates to."""
        limit = self.settings.max_body_bytes
        inflate = _decompressor(request.headers.get("content-encoding"))
        check_declared(request, limit)
        received, body = 0, bytearray()
        async with arriving(bodies.BODY_SECONDS):
            async for chunk in request.stream():
                received += len(chunk)
                body += _inflated(inflate, chunk, limit - len(body)) if inflate else chunk
                if received > limit or len(body) > limit:
                    raise too_large(max(received, len(body)), limit)
        if inflate and not inflate.eof:
            raise _bad_gzip("the gzip stream ends early")
        if inflate and inflate.unused_data:
            raise _bad_gzip("data follows the gzip stream (send one gzip member)")
        return bytes(body)


def _decompressor(encoding: str | None) -> Any:
    kind = (encoding or "identity").strip().lower()
    if kind == "identity":
        return None
    if kind == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    raise Problem(
        UNSUPPORTED_ENCODING,
        f"Content-Encoding {kind!r} is not accepted; send gzip or no encoding",
    )


def _inflated(inflate: Any, chunk: bytes, room: int) -> bytes:
    try:
        return bytes(inflate.decompress(chunk, room + 1))  # one byte over reveals excess
    except zlib.error as exc:
        raise _bad_gzip(f"the body is not valid gzip: {exc}") from exc


def _bad_gzip(detail: str) -> Problem:
    return Problem(MALFORMED_BODY, detail)


def openapi_schemas() -> dict[str, Any]:
    """The usage event's JSON Schemas, for the OpenAPI document's components."""
    return component_schemas(UsageEvent)


def _body_schemas(max_batch: int) -> dict[str, Any]:
    one = ref(UsageEvent)
    batch = {"type": "array", "items": one, "minItems": 1, "maxItems": max_batch}
    return {
        parsing.SINGLE: {"schema": one},
        parsing.BATCH: {"schema": batch},
        parsing.JSON: {"schema": {"oneOf": [batch, one]}},
    }


def _responses() -> dict[int | str, dict[str, Any]]:
    responses = problem_responses(400, 401, 403, 413, 415, 422, 429, 503)
    responses[503] = responses[503] | {
        "description": "Nothing accepted, retry after Retry-After: `broker-unavailable` when"
        " Kafka did not acknowledge in time; `overloaded` while the aggregator is more than"
        " TALLY_INGEST_MAX_LAG_SECONDS behind (the body is not read).",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying the whole request.",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }
    return responses


def router(ingest: Ingest) -> APIRouter:
    api = APIRouter(tags=["ingest"])
    documented = {"required": True, "content": _body_schemas(ingest.settings.max_batch_events)}

    @api.post(
        "/v1/events",
        status_code=202,
        response_class=JSONResponse,
        response_model=IngestReceipt,  # documents the body publish builds by hand
        responses=_responses(),
        summary="Ingest usage events (CloudEvents 1.0, one or a batch)",
        openapi_extra={"requestBody": documented, "parameters": [PREFER, *BINARY_MODE]},
    )
    async def post_events(request: Request) -> Response:
        subject = await admit(ingest, request)
        if binary.is_binary(request.headers):
            return await _binary(ingest, request, subject)
        kind = parsing.media_type(request.headers.get("content-type"))
        body = await ingest.read_body(request)
        minimal = prefers_minimal(request.headers.get("prefer"))
        return await _batch(ingest, body, kind, subject, minimal)

    return api


@without_collection
async def _batch(
    ingest: Ingest, body: bytes, kind: str, subject: str | None, minimal: bool
) -> Response:
    """A request's events judged and published, with no garbage collection meanwhile."""
    raw_items = parsing.items(body, kind, ingest.settings.max_batch_events)
    received_at = utcnow()
    verdicts = await ingest.judge(raw_items, received_at, subject)
    return await publish(ingest, verdicts, received_at, minimal)


async def admit(ingest: Ingest, request: Request) -> str | None:
    """Authenticate, then refuse while overloaded: every ingest route, before its body."""
    subject = await ingest.authenticate(request)
    if ingest.guard is not None:
        ingest.guard.admit()  # before the body: an overloaded ingest reads nothing
    return subject


async def _binary(ingest: Ingest, request: Request, subject: str | None) -> Response:
    """A CloudEvent in HTTP binary mode: judged as its structured form, its errors named
    after the ``ce-*`` headers the client sent."""
    body = await ingest.read_body(request)
    raw = binary.binary_event(request.headers, body)
    received_at = utcnow()
    verdicts = await ingest.judge([raw], received_at, subject)
    for verdict in verdicts:
        verdict.errors = [
            parsing.FieldError(binary.header_name(e.field), e.reason) for e in verdict.errors
        ]
    return await publish(
        ingest, verdicts, received_at, prefers_minimal(request.headers.get("prefer"))
    )


def prefers_minimal(prefer: str | None) -> bool:
    """Whether a ``Prefer`` header (RFC 7240) asks for ``return=minimal``.

    An emitter that sends thousands of events a second needs the counts and what went
    wrong, not an "accepted" line per event: for a batch of 2,000 that is a 60 kB answer
    to build here and to decode there.  Other preferences are ignored, as the RFC says."""
    if not prefer:
        return False
    for preference in prefer.split(","):
        name, _, value = preference.partition(";")[0].partition("=")
        if name.strip().lower() == "return" and value.strip().strip('"').lower() == "minimal":
            return True
    return False


async def durably(ingest: Ingest, events: Sequence[Publishable], received_at: datetime) -> None:
    """Publish ``events``, returning once they are durable; else 503 with ``Retry-After``,
    having reported nothing accepted."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(ingest.settings.kafka_publish_timeout):
            await ingest.publisher.publish(events, received_at, ingest.catalog_version)
    except JournalError as exc:
        log.error("write-ahead log failed", error=repr(exc), events=len(events))
        raise Problem(
            JOURNAL_UNAVAILABLE,
            "the write-ahead log could not store the events (disk full or an I/O error), so"
            " none is reported accepted; retry the whole request",
            headers={"Retry-After": "1"},
        ) from exc
    except Exception as exc:  # including TimeoutError: a broker that is down, not slow
        log.error("kafka publish failed", error=repr(exc), events=len(events))
        raise Problem(
            BROKER_UNAVAILABLE,
            "Kafka did not acknowledge all the events, so none is reported accepted; retry the"
            " whole request (events that did get stored are dropped as duplicates)",
            headers={"Retry-After": "1"},
        ) from exc
    metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)


async def publish(
    ingest: Ingest, verdicts: list[parsing.Verdict], received_at: datetime, minimal: bool
) -> Response:
    request_id = uuid.uuid4().hex
    accepted = [v.event for v in verdicts if v.status is Status.ACCEPTED and v.event]
    rejected = [v for v in verdicts if v.status is Status.REJECTED]
    duplicates = len(verdicts) - len(accepted) - len(rejected)
    metrics.INGEST_REQUEST_EVENTS.observe(len(verdicts))
    await durably(ingest, accepted, received_at)
    if rejected:
        await dead_letter(ingest, rejected, received_at, request_id)
    count(accepted, rejected, duplicates)
    summary = {
        "request_id": request_id,
        "accepted": len(accepted),
        "duplicates": duplicates,
        "rejected": len(rejected),
        "results": [
            v.summary() for v in verdicts if not minimal or v.status is not Status.ACCEPTED
        ],
    }
    if not accepted and not duplicates:
        raise Problem(INVALID_EVENTS, first_rejection(rejected), None, **summary)
    headers = MINIMAL_APPLIED if minimal else None
    return Response(
        orjson.dumps(summary), status_code=202, media_type="application/json", headers=headers
    )


async def dead_letter(
    ingest: Ingest, rejected: list[parsing.Verdict], received_at: datetime, request_id: str
) -> None:
    try:  # bounded too: the accepted events are stored, their 202 must not wait on this
        async with asyncio.timeout(ingest.settings.kafka_publish_timeout):
            await ingest.publisher.dead_letter(rejected, received_at, request_id)
    except Exception as exc:  # the accepted events are safe; losing a DLQ copy is logged
        log.error("dead-letter publish failed", error=repr(exc), events=len(rejected))


def count(accepted: list[Any], rejected: list[parsing.Verdict], duplicates: int) -> None:
    metrics.EVENTS_ACCEPTED.inc(len(accepted))
    metrics.EVENTS_DUPLICATE_IN_REQUEST.inc(duplicates)
    for verdict in rejected:
        field = verdict.errors[0].field.split(".", 1)[0].split("[", 1)[0]
        metrics.EVENTS_REJECTED.labels(field or "body").inc()


def first_rejection(rejected: list[parsing.Verdict]) -> str:
    """Where the first rejected event went wrong, and how many more were: a problem's detail."""
    first = rejected[0].errors[0]
    where = (
        f"event {rejected[0].index}: {first.field}" if first.field else f"event {rejected[0].index}"
    )
    more = f" (and {len(rejected) - 1} more events)" if len(rejected) > 1 else ""
    return f"{where} {first.reason}{more}"
