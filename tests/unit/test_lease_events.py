"""Events spent under a lease: the ``tallylease`` attribute, through ingest's model, the
envelope and the aggregator's settlement operations."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from schemas.catalog import Catalog, Meter
from schemas.envelope import StoredEvent, decode, encode
from schemas.events import VALUE_SCALE, UsageEvent
from services.aggregator.increments import build

NOW = datetime(2026, 11, 3, 10, 15, tzinfo=UTC)
LEASE = "ls_0123456789abcdef"


def usage(**extra: Any) -> UsageEvent:
    return UsageEvent.model_validate(
        {
            "specversion": "1.0",
            "id": "evt-1",
            "source": "edge",
            "type": "api_call",
            "subject": "cust_42",
            "time": NOW.isoformat(),
        }
        | extra
    )


def test_the_lease_travels_from_the_event_through_the_envelope() -> None:
    stored = StoredEvent.from_usage(usage(tallylease=LEASE), NOW)
    payload = encode("cust_42", [stored], NOW)
    assert orjson.loads(payload)["events"][0]["lease"] == LEASE
    [event] = decode(payload)
    assert event.lease == LEASE and event == stored


def test_ingest_publishes_the_lease_of_a_validated_event() -> None:
    """Ingest puts ``UsageEvent``s themselves in envelopes (``services.ingest.publisher``)."""
    [event] = decode(encode("cust_42", [usage(tallylease=LEASE)], NOW))
    assert event.lease == LEASE


def test_an_event_without_a_lease_carries_none_in_the_envelope() -> None:
    payload = encode("cust_42", [StoredEvent.from_usage(usage(), NOW)], NOW)
    assert "lease" not in orjson.loads(payload)["events"][0]
    assert decode(payload)[0].lease == ""


@pytest.mark.parametrize("bad", ["", "ls_short", "0123456789abcdefghij", "ls_0123456789abcde!"])
def test_a_malformed_lease_is_refused_naming_the_attribute(bad: str) -> None:
    with pytest.raises(ValidationError) as refused:
        usage(tallylease=bad)
    assert [e["loc"] for e in refused.value.errors()] == [("tallylease",)]


def meters() -> dict[str, list[Meter]]:
    index: dict[str, list[Meter]] = {}
    for meter in Catalog.default().meters:
        index.setdefault(meter.event_type, []).append(meter)
    return index


def event(ident: str, kind: str, value: str, lease: str = "") -> StoredEvent:
    return StoredEvent(ident, "edge", kind, "cust_42", NOW, Decimal(value), {}, NOW, lease)


def test_counting_settles_what_each_lease_spent_of_each_additive_meter() -> None:
    ops = build(
        "cust_42",
        [
            event("a", "api_call", "1", LEASE),
            event("b", "api_call", "1", LEASE),
            event("c", "api_call", "1"),  # not under a lease
            event("d", "compute", "2.5", "ls_fedcba9876543210"),
            event("e", "storage", "7", LEASE),  # a max meter: never held, never settled
        ],
        meters(),
        NOW,
    )
    assert dict(ops.settle) == {
        (LEASE, "api_calls"): 2 * VALUE_SCALE,
        ("ls_fedcba9876543210", "compute_seconds"): 2_500_000,
    }
