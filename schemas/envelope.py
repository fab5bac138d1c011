"""The Kafka record format on ``tally.events``: a batch of events, grouped by customer.

Per-record overhead in Faust is about 200 µs, so ingest packs events into envelopes; the
aggregator's cost then scales with events, not records.  Version 1 held one customer's
events from one request; a 100-event request naming 50 customers made 50 records of two
events, and 10,000 events/s of such requests (5,000 records/s) were more than one
aggregator could take.  Version 2 (what ingest writes) holds the events of every
customer of a request whose key hashes to the same partition: at most one record per
partition per request.  Its key is one of those customers, so partitioning by key puts
it where all of them belong and a customer's events stay in one partition, in order —
what the aggregator's per-customer offsets rely on.  Version 1 is still read (records
written before, kept in a write-ahead log or in Kafka).

Envelopes are JSON (orjson) with decimal values as strings so nothing on the way turns
them into floats.  ``received_at`` is the ingest time of every event inside.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, Protocol, TypeVar

import jiter
import orjson

from schemas.events import UsageEvent

ENVELOPE_VERSION = 2
SINGLE_CUSTOMER_VERSION = 1
MAX_EVENTS_PER_ENVELOPE = 500
MAX_ENVELOPE_BYTES = 900 * 1024
"""Under Kafka's (and Faust's) default 1 MB ``message.max.bytes``: envelopes, and the
dead letters made of them, whatever the events' sizes."""


class StoredEvent(NamedTuple):
    """An event as it travels inside Tally: flat, typed, cheap to build.

    A named tuple rather than a frozen dataclass: the aggregator builds one per event it
    decodes, and a frozen dataclass's ``__init__`` sets each of its eleven fields through
    ``object.__setattr__`` (2.2 µs an event against 0.9 here)."""

    id: str
    source: str
    type: str
    customer: str
    time: datetime
    value: Decimal
    dimensions: dict[str, str]
    received_at: datetime
    lease: str = ""  # the lease it was spent under ('' for none), settled when counted
    # The data object as sent, as JSON text, when it holds nested members (meters read it
    # by path, ``schemas.paths``); "" for flat data — and events from before it was kept —
    # whose meters read ``value`` and ``dimensions``.
    data: str = ""
    # The meter catalog version ingest held (``MeterIndex.version``): a meter created at
    # version v counts live only events stamped >= v; older ones are back-filled.
    catalog_version: int = 0

    @classmethod
    def from_usage(
        cls, event: UsageEvent, received_at: datetime, catalog_version: int = 0
    ) -> StoredEvent:
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
            data=event.data.as_json(),
            catalog_version=catalog_version,
        )

    def wire(self) -> tuple[dict[str, str], str]:
        return self.dimensions, self.data

    def parsed_data(self) -> dict[str, Any] | None:
        """``data`` as a dict with exact decimals, None for flat data."""
        return jiter.from_json(self.data.encode(), float_mode="decimal") if self.data else None


class EventLike(Protocol):
    """What an envelope needs of an event: a ``UsageEvent``, a ``StoredEvent`` or a
    correction."""

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
    def lease(self) -> str: ...
    def wire(self) -> tuple[dict[str, str], str]:
        """Its dimensions and its nested data as JSON text ("" for flat data)."""
        ...


class Publishable(EventLike, Protocol):
    """What ingest publishes: an event and the customer it is about (``subject``): a
    ``UsageEvent``, or a correction (``schemas.corrections.CorrectionEvent``)."""

    @property
    def subject(self) -> str: ...


def encode(customer: str, events: Iterable[EventLike], received_at: datetime) -> bytes:
    """One customer's events as a version-1 envelope."""
    return orjson.dumps(
        {
            "v": SINGLE_CUSTOMER_VERSION,
            "customer": customer,
            "received_at": received_at.isoformat(),
            "events": [_event(e) for e in events],
        }
    )


def encode_shares(
    shares: Iterable[tuple[str, Iterable[EventLike]]],
    received_at: datetime,
    catalog_version: int = 0,
) -> bytes:
    """Several customers' events, as (customer, events) pairs, in one envelope, stamped
    with the meter catalog version ingest held (``cv``, absent when 0)."""
    body: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "received_at": received_at.isoformat(),
        "shares": [
            {"customer": customer, "events": [_event(e) for e in events]}
            for customer, events in shares
        ],
    }
    if catalog_version:
        body["cv"] = catalog_version
    return orjson.dumps(body)


def _event(e: EventLike) -> dict[str, Any]:
    dimensions, data = e.wire()
    encoded = {
        "id": e.id,
        "source": e.source,
        "type": e.type,
        "time": e.time,  # orjson writes isoformat()'s text, in a tenth of its time
        "value": str(e.value),
        "dims": dimensions,
    }
    if e.lease:  # only when there is one: most events have none
        encoded["lease"] = e.lease
    if data:  # only nested data: flat data is value and dims
        encoded["data"] = data
    return encoded


def decode(payload: bytes) -> list[StoredEvent]:
    """Every event of an envelope (either version), each with its customer."""
    return [event for _, events in decode_shares(payload) for event in events]


def decode_shares(payload: bytes) -> list[tuple[str, list[StoredEvent]]]:
    """An envelope's events as (customer, events) pairs, in the envelope's order."""
    envelope: dict[str, Any] = orjson.loads(payload)
    version = envelope.get("v")
    if version == ENVELOPE_VERSION:
        shares = [(share["customer"], share["events"]) for share in envelope["shares"]]
    elif version == SINGLE_CUSTOMER_VERSION:
        shares = [(envelope["customer"], envelope["events"])]
    else:
        raise ValueError(f"unsupported envelope version {version!r}")
    received_at = _aware(envelope["received_at"])
    version = envelope.get("cv", 0)
    return [
        (customer, [_stored(raw, customer, received_at, version) for raw in events])
        for customer, events in shares
    ]


def _stored(
    raw: dict[str, Any], customer: str, received_at: datetime, catalog_version: int
) -> StoredEvent:
    return StoredEvent(  # by position: the fields' order, and the cheapest call
        raw["id"],
        raw["source"],
        raw["type"],
        customer,
        _aware(raw["time"]),
        Decimal(raw["value"]),
        raw["dims"],
        received_at,
        raw.get("lease", ""),
        raw.get("data", ""),
        catalog_version,
    )


def _aware(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"time without a UTC offset: {text!r}")
    return moment


E = TypeVar("E")


def chunks(events: list[E], size: int = MAX_EVENTS_PER_ENVELOPE) -> Iterator[list[E]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


def envelopes(
    shares: Iterable[tuple[str, list[E]]], received_at: datetime, catalog_version: int = 0
) -> Iterator[bytes]:
    """The events of several customers, as (customer, events) pairs, as encoded
    version-2 envelopes within both limits; a customer's events keep their order.

    A chunk that encodes too large is halved until it fits (an event is at most a few KiB).
    """
    flat = [(customer, event) for customer, events in shares for event in events]
    for chunk in chunks(flat):
        yield from _fitting(chunk, received_at, catalog_version)


def _fitting(
    pairs: list[tuple[str, Any]], received_at: datetime, catalog_version: int
) -> Iterator[bytes]:
    grouped: dict[str, list[Any]] = {}
    for customer, event in pairs:
        grouped.setdefault(customer, []).append(event)
    encoded = encode_shares(grouped.items(), received_at, catalog_version)
    if len(encoded) <= MAX_ENVELOPE_BYTES or len(pairs) == 1:
        yield encoded
        return
    middle = len(pairs) // 2
    yield from _fitting(pairs[:middle], received_at, catalog_version)
    yield from _fitting(pairs[middle:], received_at, catalog_version)
