"""Usage events as Tally ingests them: CloudEvents 1.0 in structured JSON.

An event's identity, (``source``, ``id``), and its ``time`` are fixed when it is emitted,
never when it is sent: a retry then carries the same identity, so Tally drops the copy,
and an event delayed by an outage still counts in the minute it happened.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

Value = Decimal | int | float | str
"""``data.value``; sent as a string when it is not an int, so no digit is lost to floats."""

Dimension = str | int
"""A dimension value; Tally stores numbers as strings."""


def new_id() -> str:
    return uuid.uuid4().hex


def timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 with an offset.  A naive datetime is refused here rather than by ingest,
    where the rejection would only show up later, in a report."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("event time must be timezone-aware, e.g. datetime.now(UTC)")
    return moment.isoformat()


def usage_event(
    type: str,
    subject: str,
    value: Value | None = None,
    *,
    time: datetime | None = None,
    id: str | None = None,
    dimensions: Mapping[str, Dimension] | None = None,
) -> dict[str, Any]:
    """An event without a ``source``: the client that sends it adds its own."""
    data: dict[str, Any] = dict(dimensions or {})
    if value is not None:
        data["value"] = value if isinstance(value, int) else str(value)
    return {
        "specversion": "1.0",
        "id": id or new_id(),
        "type": type,
        "subject": subject,
        "time": timestamp(time),
        "data": data,
    }


def completed(event: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A copy of ``event`` with what the wire format requires and the caller left out."""
    time = event.get("time")
    return {
        "specversion": "1.0",
        "source": source,
        **event,
        "id": event.get("id") or new_id(),
        "time": timestamp(time) if isinstance(time, datetime) or time is None else time,
    }
