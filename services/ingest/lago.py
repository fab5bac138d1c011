"""Lago's event API (``POST /api/v1/events`` and ``/api/v1/events/batch``) onto Tally's event.

A seller moving from Lago keeps its emitters: ``lago-python-client`` and the other Lago
SDKs post ``{"event": {...}}`` or ``{"events": [...]}`` and read Lago's answers.  Each
Lago event becomes the CloudEvent ``/v1/events`` takes, and goes through the same
validation, de-duplication and dead-letter path:

- ``transaction_id`` → ``id``, with ``source`` fixed to ``lago`` (so (source, id) is
  Lago's own idempotency key);
- ``external_customer_id``, else ``external_subscription_id`` (Tally has no subscription
  to resolve it to a customer: the subscription's id IS the subject) → ``subject``;
- ``code`` (a billable metric's code: a meter's name) → the ``event_type`` of the meter
  of that name (the process's ``MeterCache``: a new meter is seen as soon as PostgreSQL
  notifies it), so the event reaches that meter; any other code is taken as the type;
- ``timestamp`` (Unix seconds, number or string; absent: now) → ``time``;
- ``properties`` → ``data``.

Lago validates a request as a whole: one bad event refuses the batch with 422 and
Lago's ``validation_errors`` body; the bad ones are still copied to the dead-letter topic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from fastapi.responses import Response

from schemas.catalog import Meter
from schemas.date_times import NOT_RFC3339
from services.ingest import parsing

SOURCE = "lago"
_FIELDS = {  # Tally's field → Lago's
    "id": "transaction_id",
    "subject": "external_subscription_id",
    "type": "code",
    "time": "timestamp",
    "data": "properties",
}


class BadRequest(Exception):
    """A body that is not Lago's request shape: answered 400 as Lago does."""


def events_of(parsed: Any, batch: bool) -> list[Any]:
    root = "events" if batch else "event"
    value = parsed.get(root) if isinstance(parsed, dict) else None
    if value is None or value == [] or value == {}:
        raise BadRequest(f"param is missing or the value is empty: {root}")
    if batch and not isinstance(value, list):
        raise BadRequest("events must be an array")
    return list(value) if batch else [value]


def cloudevent(event: Any, now: datetime, meters: Mapping[str, Meter]) -> Any:
    """The CloudEvent a Lago event stands for (anything but an object is left as is, for
    validation to refuse); ``meters`` by name, as the process's meter cache holds them."""
    if not isinstance(event, dict):
        return event
    raw: dict[str, Any] = {"specversion": "1.0", "source": SOURCE}
    put = {
        "id": event.get("transaction_id"),
        "subject": event.get("external_customer_id") or event.get("external_subscription_id"),
        "type": _event_type(event.get("code"), meters),
        "time": _time(event.get("timestamp"), now),
        "data": event.get("properties"),
    }
    raw |= {name: value for name, value in put.items() if value is not None}
    return raw


def _event_type(code: Any, meters: Mapping[str, Meter]) -> Any:
    """The event type of the meter a code names; any other code is the type itself."""
    meter = meters.get(code) if isinstance(code, str) else None
    return meter.event_type if meter is not None else code


def _time(timestamp: Any, now: datetime) -> Any:
    """Lago's timestamp: Unix seconds as a number or a numeric string; absent, the time
    of receipt.  Anything else is passed on for validation to name."""
    if timestamp is None:
        return now
    if isinstance(timestamp, bool):
        return timestamp
    try:
        seconds = Decimal(str(timestamp))
        return datetime.fromtimestamp(float(seconds), UTC)
    except (InvalidOperation, ValueError, OverflowError, OSError):
        return timestamp


def error_details(
    verdicts: list[parsing.Verdict], events: list[Any], batch: bool
) -> dict[str, Any]:
    """Lago's ``error_details``: field → reasons for one event; by index for a batch."""
    by_event = {
        str(v.index): _details(v, events[v.index])
        for v in verdicts
        if v.status is parsing.Status.REJECTED
    }
    if batch:
        return by_event
    return next(iter(by_event.values()))


def _details(verdict: parsing.Verdict, event: Any) -> dict[str, list[str]]:
    fields = _FIELDS
    if isinstance(event, dict) and event.get("external_customer_id"):
        fields = _FIELDS | {"subject": "external_customer_id"}  # the one that became it
    details: dict[str, list[str]] = {}
    for error in verdict.errors:
        head, dot, rest = error.field.partition(".")
        name = fields.get(head, head) + dot + rest
        details.setdefault(name or "event", []).append(_reason(head, error.reason))
    return details


def _reason(field: str, reason: str) -> str:
    """A reason in Lago's terms: its word for a missing field, and what its
    ``timestamp`` is (Unix seconds) where Tally's ``time`` would ask for RFC 3339."""
    if reason.lower().startswith("field required"):
        return "value_is_mandatory"
    if field == "time" and reason.removeprefix("Value error, ") == NOT_RFC3339:
        return "must be Unix seconds (a number or a numeric string) before the year 10000"
    return reason


def _json(body: dict[str, Any], status: int = 200) -> Response:
    # properties keep jiter's exact Decimals; Lago echoes them as JSON numbers
    try:
        content = orjson.dumps(body, default=float)
    except TypeError:  # an integer beyond 64 bits, which orjson cannot write
        content = json.dumps(body, default=float).encode()
    return Response(content, status_code=status, media_type="application/json")


def unprocessable(details: dict[str, Any]) -> Response:
    return _json(
        {
            "status": 422,
            "error": "Unprocessable Entity",
            "code": "validation_errors",
            "error_details": details,
        },
        422,
    )


def bad_request(message: str) -> Response:
    return _json({"status": 400, "error": f"BadRequest: {message}"}, 400)


def answer(events: list[dict[str, Any]], received_at: datetime, batch: bool) -> Response:
    """200 with the events as Lago serialises them (ids Tally has no counterpart for,
    ``lago_id`` and the like, are null)."""
    shown = [_shown(e, received_at) for e in events]
    return _json({"events": shown} if batch else {"event": shown[0]})


def _shown(event: dict[str, Any], received_at: datetime) -> dict[str, Any]:
    return {
        "lago_id": None,
        "transaction_id": event.get("transaction_id"),
        "lago_customer_id": None,
        "external_customer_id": event.get("external_customer_id"),
        "lago_subscription_id": None,
        "external_subscription_id": event.get("external_subscription_id"),
        "code": event.get("code"),
        "timestamp": _iso(_time(event.get("timestamp"), received_at), milliseconds=True),
        "precise_total_amount_cents": event.get("precise_total_amount_cents"),
        "properties": event.get("properties") or {},
        "created_at": _iso(received_at),
    }


def _iso(moment: datetime, milliseconds: bool = False) -> str:
    """As Lago's serializer writes times: ISO 8601 in UTC with ``Z``, the event's
    ``timestamp`` to the millisecond (Ruby's ``iso8601(3)``), ``created_at`` to the second."""
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds" if milliseconds else "seconds")
    return text.replace("+00:00", "Z")
