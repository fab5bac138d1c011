"""``/api/v1/events``: the ingest path other metering products' emitters already post to.

The one path is both Lago's event API and OpenMeter's ingest (CloudEvents, 204): a body
with a top-level ``event`` key is Lago's; CloudEvents media types, or a CloudEvent JSON,
are OpenMeter's.  ``/api/v1/events/batch`` is Lago's only.  Both end in the same
validation, de-duplication and dead-letter path as ``/v1/events``.
"""

from __future__ import annotations

import uuid
from typing import Any

import jiter
from fastapi import APIRouter, Request
from fastapi.responses import Response

from schemas.events import utcnow
from services.ingest import lago, parsing
from services.ingest.app import Ingest, admit, count, dead_letter, publish

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


def _lago_docs(root: str, schema: dict[str, Any], has_204: bool) -> dict[str, Any]:
    ok = {"type": "object", "required": [root], "properties": {root: schema}}
    shown: dict[str, Any] = {"type": "object"}
    answers: dict[str, Any] = {
        "200": {
            "description": "Lago's answer: the events as Lago serialises them.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            root: {"type": "array", "items": shown} if root == "events" else shown
                        },
                    }
                }
            },
        },
        "400": {"description": "Lago's bad request.", "content": _json(LAGO_ERROR)},
        "422": {"description": "Lago's validation_errors.", "content": _json(LAGO_ERROR)},
    }
    body: dict[str, Any] = {"application/json": {"schema": ok}}
    if has_204:
        answers["204"] = {"description": "OpenMeter's answer: CloudEvents accepted."}
        body[parsing.SINGLE] = {"schema": {"type": "object"}}
        body[parsing.BATCH] = {"schema": {"type": "array", "items": {"type": "object"}}}
    return {"requestBody": {"required": True, "content": body}, "responses": answers}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def router(ingest: Ingest) -> APIRouter:
    api = APIRouter(tags=["ingest"])
    batch = {"type": "array", "items": LAGO_EVENT, "minItems": 1}

    @api.post(
        "/api/v1/events",
        summary="Lago's event API (one event), or OpenMeter's CloudEvents ingest (204)",
        openapi_extra=_lago_docs("event", LAGO_EVENT, True),
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
        openapi_extra=_lago_docs("events", batch, False),
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


async def _openmeter(ingest: Ingest, body: bytes, kind: str, subject: str | None) -> Response:
    """OpenMeter answers 204 with no body once the events are stored."""
    raw_items = parsing.items(body, kind, ingest.settings.max_batch_events)
    received_at = utcnow()
    verdicts = parsing.judge(raw_items, ingest.bounds, received_at, subject)
    await publish(ingest, verdicts, received_at, True)
    return Response(status_code=204)


async def _lago(ingest: Ingest, body: bytes, subject: str | None, batch: bool) -> Response:
    try:
        events = lago.events_of(jiter.from_json(body, float_mode="decimal"), batch)
    except ValueError as exc:
        return lago.bad_request(f"the body is not valid JSON: {exc}")
    except lago.BadRequest as exc:
        return lago.bad_request(str(exc))
    if len(events) > ingest.settings.max_batch_events:
        return lago.unprocessable({"events": ["too_many_events"]})
    received_at = utcnow()
    types = await ingest.codes.types() if ingest.codes is not None else {}
    raws = [lago.cloudevent(event, received_at, types) for event in events]
    verdicts = parsing.judge(raws, ingest.bounds, received_at, subject)
    rejected = [v for v in verdicts if v.status is parsing.Status.REJECTED]
    if rejected:  # Lago refuses the whole request; the bad events still reach the DLQ
        await dead_letter(ingest, rejected, received_at, uuid.uuid4().hex)
        count([], rejected, 0)
        return lago.unprocessable(lago.error_details(verdicts, batch))
    await publish(ingest, verdicts, received_at, True)
    return lago.answer([e for e in events if isinstance(e, dict)], received_at, batch)
