"""``/api/v1/events``: the ingest path other metering products' emitters already post to.

The one path is both Lago's event API and OpenMeter's ingest (CloudEvents, 204): a body
with a top-level ``event`` key is Lago's; CloudEvents media types, or a CloudEvent JSON,
are OpenMeter's.  ``/api/v1/events/batch`` is Lago's only.  Both end in the same
validation, de-duplication and dead-letter path as ``/v1/events``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jiter
from fastapi import APIRouter, Request
from fastapi.responses import Response

from schemas.catalog import Meter
from schemas.events import UsageEvent, utcnow
from schemas.problem_types import EVENTS_REFUSED
from services.common.collector import without_collection
from services.common.openapi import problem_responses, ref
from services.common.problems import Problem
from services.ingest import lago, parsing
from services.ingest.app import Ingest, admit, count, dead_letter, first_rejection, publish

LAGO_EVENT = {
    "type": "object",
    "required": ["transaction_id", "code"],
    "properties": {
        "transaction_id": {"type": "string"},
        "external_subscription_id": {"type": "string"},
        "external_customer_id": {"type": "string"},
        "code": {"type": "string"},
        "timestamp": {"type": ["integer", "number", "string"]},
        "properties": {"type": "object"},
    },
}
LAGO_ERROR = {
    "type": "object",
    "required": ["status", "error"],
    "properties": {
        "status": {"type": "integer"},
        "error": {"type": "string"},
        "code": {"type": "string"},
        "error_details": {"type": "object"},
    },
}
NULLABLE_TEXT = {"type": ["string", "null"]}
LAGO_SHOWN = {
    "type": "object",
    "required": ["transaction_id", "code", "timestamp", "properties", "created_at"],
    "properties": {
        "lago_id": NULLABLE_TEXT,
        "transaction_id": {"type": "string"},
        "lago_customer_id": NULLABLE_TEXT,
        "external_customer_id": NULLABLE_TEXT,
        "lago_subscription_id": NULLABLE_TEXT,
        "external_subscription_id": NULLABLE_TEXT,
        "code": {"type": "string"},
        "timestamp": {"type": "string"},
        "precise_total_amount_cents": NULLABLE_TEXT,
        "properties": {"type": "object"},
        "created_at": {"type": "string"},
    },
}


def _lago_docs(
    root: str, schema: dict[str, Any], openmeter: bool
) -> tuple[dict[str, Any], dict[int | str, Any]]:
    """Lago's answers (plain JSON) beside the problem+json ones Tally gives before the
    body is read (token, size, overload) and, with ``openmeter``, OpenMeter's."""
    shown = {"type": "array", "items": LAGO_SHOWN} if root == "events" else LAGO_SHOWN
    answers: dict[int | str, Any] = problem_responses(400, 401, 403, 413, 415, 422, 429, 503)
    answers[200] = {
        "description": "Lago's answer: the events as Lago serialises them.",
        "content": _json({"type": "object", "required": [root], "properties": {root: shown}}),
    }
    for status, what in ((400, "Lago's BadRequest"), (422, "Lago's validation_errors")):
        answers[status]["content"] |= _json(LAGO_ERROR)
        answers[status]["description"] = f"{what} (JSON), or a problem (problem+json)."
    ok = {"type": "object", "required": [root], "properties": {root: schema}}
    body: dict[str, Any] = {parsing.JSON: {"schema": ok}}
    if openmeter:
        answers[204] = {"description": "OpenMeter's answer: the CloudEvents are stored."}
        body[parsing.SINGLE] = {"schema": ref(UsageEvent)}
        body[parsing.BATCH] = {"schema": {"type": "array", "items": ref(UsageEvent)}}
    return {"requestBody": {"required": True, "content": body}}, answers


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {parsing.JSON: {"schema": schema}}


def router(ingest: Ingest) -> APIRouter:
    api = APIRouter(tags=["ingest"])
    batch = {"type": "array", "items": LAGO_EVENT, "minItems": 1}
    one_body, one_answers = _lago_docs("event", LAGO_EVENT, True)
    batch_body, batch_answers = _lago_docs("events", batch, False)

    @api.post(
        "/api/v1/events",
        summary="Lago's event API (one event), or OpenMeter's CloudEvents ingest (204)",
        response_class=Response,
        responses=one_answers,
        openapi_extra=one_body,
    )
    async def post_one(request: Request) -> Response:
        subject = await admit(ingest, request)
        kind = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        body = await ingest.read_body(request)
        if kind in (parsing.SINGLE, parsing.BATCH) or not _is_lago(body):
            return await _openmeter(ingest, body, parsing.media_type(kind), subject)
        return await _lago(ingest, body, subject, batch=False)

    @api.post(
        "/api/v1/events/batch",
        summary="Lago's event API (a batch)",
        response_class=Response,
        responses=batch_answers,
        openapi_extra=batch_body,
    )
    async def post_batch(request: Request) -> Response:
        subject = await admit(ingest, request)
        return await _lago(ingest, await ingest.read_body(request), subject, batch=True)

    return api


def _is_lago(body: bytes) -> bool:
    """An object with a top-level ``event``, or any object that is not a CloudEvent (no
    ``specversion``): Lago's request, or one Lago would answer 400."""
    try:
        parsed = jiter.from_json(body, float_mode="decimal")
    except ValueError:
        return True  # answered as Lago answers malformed JSON
    if isinstance(parsed, dict):
        return "event" in parsed or "specversion" not in parsed
    return not isinstance(parsed, list)


@without_collection
async def _openmeter(ingest: Ingest, body: bytes, kind: str, subject: str | None) -> Response:
    """OpenMeter's answers: 204 with no body once the events are stored; 400 for a request
    holding an invalid event, of which nothing is stored (the invalid events still reach
    the DLQ).  As OpenMeter does, an event without ``time`` happened when it arrived."""
    raw_items = parsing.items(body, kind, ingest.settings.max_batch_events)
    received_at = utcnow()
    stamped = [_timed(item, received_at) for item in raw_items]
    verdicts = await ingest.judge(stamped, received_at, subject)
    rejected = await _refused(ingest, verdicts, received_at)
    if rejected:
        raise Problem(
            EVENTS_REFUSED,
            f"{first_rejection(rejected)}; nothing of the request was stored",
            results=[v.summary() for v in rejected],
        )
    await publish(ingest, verdicts, received_at, True)
    return Response(status_code=204)


async def _refused(
    ingest: Ingest, verdicts: list[parsing.Verdict], received_at: datetime
) -> list[parsing.Verdict]:
    """The invalid events of a request that one of them refuses whole (Lago's and
    OpenMeter's way): nothing of it is stored, the invalid ones go to the DLQ."""
    rejected = [v for v in verdicts if v.status is parsing.Status.REJECTED]
    if rejected:
        await dead_letter(ingest, rejected, received_at, uuid.uuid4().hex)
        count([], rejected, 0)
    return rejected


def _timed(item: Any, received_at: datetime) -> Any:
    """An OpenMeter event without ``time`` (its SDK may leave it out), stamped with the
    time it arrived; anything else as it came, for validation to judge."""
    if isinstance(item, dict) and item.get("time") is None:
        return item | {"time": received_at.isoformat()}
    return item


async def _lago(ingest: Ingest, body: bytes, subject: str | None, batch: bool) -> Response:
    try:
        events = lago.events_of(jiter.from_json(body, float_mode="decimal"), batch)
    except ValueError as exc:
        return lago.bad_request(f"the body is not valid JSON: {exc}")
    except lago.BadRequest as exc:
        return lago.bad_request(str(exc))
    if len(events) > min(ingest.settings.lago_batch_max_events, ingest.settings.max_batch_events):
        return lago.unprocessable({"events": ["too_many_events"]})
    received_at = utcnow()
    meters = (await ingest.meters.meters()).by_name if ingest.meters is not None else {}
    refusal = await _lago_stored(ingest, events, received_at, meters, subject, batch)
    if refusal is not None:
        return refusal
    return lago.answer([e for e in events if isinstance(e, dict)], received_at, batch)


@without_collection
async def _lago_stored(
    ingest: Ingest,
    events: list[Any],
    received_at: datetime,
    meters: Mapping[str, Meter],
    subject: str | None,
    batch: bool,
) -> Response | None:
    """Lago's events judged and stored whole, else Lago's 422 saying why (the answer)."""
    raws = [lago.cloudevent(event, received_at, meters) for event in events]
    verdicts = await ingest.judge(raws, received_at, subject)
    if await _refused(ingest, verdicts, received_at):
        return lago.unprocessable(lago.error_details(verdicts, events, batch))
    await publish(ingest, verdicts, received_at, True)
    return None
