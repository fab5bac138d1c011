"""The Kafka record format on ``tally.events``: a batch of one customer's events.

Per-record overhead in Faust is about 200 µs, so ingest packs the events of one customer
from one request into envelopes; the aggregator's cost then scales with events, not
records.  Envelopes are JSON (orjson) with decimal values as strings so nothing on the
way turns them into floats.  ``received_at`` is the ingest time of every event inside.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import orjson

from schemas.events import UsageEvent

ENVELOPE_VERSION = 1
MAX_EVENTS_PER_ENVELOPE = 500
MAX_ENVELOPE_BYTES = 900 * 1024
"""Under Kafka's (and Faust's) default 1 MB ``message.max.bytes``: envelopes, and the
dead letters made of them, whatever the events' sizes."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as it travels inside Tally: flat, typed, cheap to build and hash."""

    id: str
    source: str
    type: str
    customer: str
    time: datetime
    value: Decimal
    dimensions: dict[str, str]
    received_at: datetime
    lease: str = ""  # the lease it was spent under ('' for none), settled when counted

    @classmethod
    def from_usage(cls, event: UsageEvent, received_at: datetime) -> StoredEvent:
        return cls(
            id=event.id,
            source=event.source,
            type=event.type,
            customer=event.subject,
            time=event.time,
            value=event.value,
            dimensions=event.dimensions,
            received_at=received_at,
            lease=event.lease,
        )


class EventLike(Protocol):
    """What an envelope needs of an event: a ``UsageEvent`` or a ``StoredEvent``."""

    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def time(self) -> datetime: ...
    @property
    def value(self) -> Decimal: ...
    @property
    def dimensions(self) -> dict[str, str]: ...
    @property
    def lease(self) -> str: ...


def encode(customer: str, events: Iterable[EventLike], received_at: datetime) -> bytes:
    return orjson.dumps(
        {
            "v": ENVELOPE_VERSION,
            "customer": customer,
            "received_at": received_at.isoformat(),
            "events": [_event(e) for e in events],
        }
    )


def _event(e: EventLike) -> dict[str, Any]:
    encoded = {
        "id": e.id,
        "source": e.source,
        "type": e.type,
        "time": e.time.isoformat(),
        "value": str(e.value),
        "dims": e.dimensions,
    }
    if e.lease:  # only when there is one: most events have none
        encoded["lease"] = e.lease
    return encoded


def decode(payload: bytes) -> list[StoredEvent]:
    envelope: dict[str, Any] = orjson.loads(payload)
    if envelope.get("v") != ENVELOPE_VERSION:
        raise ValueError(f"unsupported envelope version {envelope.get('v')!r}")
    customer = envelope["customer"]
    received_at = _aware(envelope["received_at"])
    return [
        StoredEvent(
            id=raw["id"],
            source=raw["source"],
            type=raw["type"],
            customer=customer,
            time=_aware(raw["time"]),
            value=Decimal(raw["value"]),
            dimensions=raw["dims"],
            received_at=received_at,
            lease=raw.get("lease", ""),
        )
        for raw in envelope["events"]
    ]


def _aware(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"time without a UTC offset: {text!r}")
    return moment


E = TypeVar("E")


def chunks(events: list[E], size: int = MAX_EVENTS_PER_ENVELOPE) -> Iterator[list[E]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


def envelopes(customer: str, events: list[E], received_at: datetime) -> Iterator[bytes]:
    """``events`` of one customer as encoded envelopes within both limits.

    A chunk that encodes too large is halved until it fits (an event is at most a few KiB).
    """
    for chunk in chunks(events):
        yield from _fitting(customer, chunk, received_at)


def _fitting(customer: str, events: list[Any], received_at: datetime) -> Iterator[bytes]:
    encoded = encode(customer, events, received_at)
    if len(encoded) <= MAX_ENVELOPE_BYTES or len(events) == 1:
        yield encoded
        return
    middle = len(events) // 2
    yield from _fitting(customer, events[:middle], received_at)
    yield from _fitting(customer, events[middle:], received_at)
