"""Usage events as Tally ingests them: CloudEvents 1.0 in structured JSON.

An event's identity, (``source``, ``id``), and its ``time`` are fixed when it is emitted,
never when it is sent: a retry then carries the same identity, so Tally drops the copy,
and an event delayed by an outage still counts in the minute it happened.

The middleware makes an id and a timestamp for every request it serves, so both are
cheap: an id is a random per-process prefix and a counter (a fifth of ``uuid4``'s cost;
unique per ``source`` because each process, forked ones included, draws its own
96-bit prefix), and the current time is formatted from a cached per-second prefix.
"""

from __future__ import annotations

import itertools
import os
import time as clock
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

Value = Decimal | int | float | str
"""``data.value``; sent as a string when it is not an int, so no digit is lost to floats."""

Dimension = str | int
"""A dimension value; Tally stores numbers as strings."""


class _Ids:
    """Event ids: ``<24 random hex digits><counter in hex>``, never repeated by a process."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)  # a forked worker must not repeat

    def reseed(self) -> None:
        self.prefix = os.urandom(12).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_ids = _Ids()
new_id = _ids.next


class _Now:
    """The current UTC time in RFC 3339: the seconds part formatted once per second (kept
    with its second as one pair: clients in two threads may share this), the
    microseconds looked up three digits at a time."""

    def __init__(self) -> None:
        self._cached: tuple[int | None, str] = (None, "")

    def read(self) -> str:
        second, nanos = divmod(clock.time_ns(), 1_000_000_000)
        cached, prefix = self._cached
        if second != cached:
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, prefix)
        micros = nanos // 1000
        return f"{prefix}.{_DIGITS[micros // 1000]}{_DIGITS[micros % 1000]}+00:00"


_DIGITS = [f"{n:03d}" for n in range(1000)]
"""Three digits of a fraction of a second, looked up: half the time of a format spec."""


now = _Now().read  # a bound method: cheaper to call than an instance's __call__


def timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 with an offset.  A naive datetime is refused here rather than by ingest,
    where the rejection would only show up later, in a report."""
    if moment is None:
        return now()
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
