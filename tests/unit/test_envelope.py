from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.envelope import (
    MAX_ENVELOPE_BYTES,
    MAX_EVENTS_PER_ENVELOPE,
    StoredEvent,
    chunks,
    decode,
    decode_shares,
    encode,
    encode_shares,
    envelopes,
)
from schemas.events import UsageEvent

RECEIVED = datetime(2026, 11, 3, 10, 15, 30, 654321, tzinfo=UTC)


def stored(i: int = 0, value: str = "1", customer: str = "cust_42", **dims: str) -> StoredEvent:
    return StoredEvent(
        id=f"evt-{i}",
        source="gateway-eu",
        type="api_call",
        customer=customer,
        time=datetime(2026, 11, 3, 10, 15, tzinfo=UTC) + timedelta(microseconds=i),
        value=Decimal(value),
        dimensions=dims,
        received_at=RECEIVED,
    )


@pytest.mark.parametrize(
    "value", ["0", "1", "0.000001", "1.5", "999999999999.999999", "1.500000000", "1E+3"]
)
def test_round_trip_keeps_decimals_exact(value: str) -> None:
    [event] = decode(encode("cust_42", [stored(value=value)], RECEIVED))
    assert event.value == Decimal(value)
    assert str(event.value) == value  # not even the representation changes


def test_value_travels_as_a_string() -> None:
    raw = orjson.loads(encode("cust_42", [stored(value="0.1")], RECEIVED))
    assert raw["events"][0]["value"] == "0.1"


def test_round_trip_keeps_everything() -> None:
    events = [stored(0, endpoint="/v1/x", status="200"), stored(1, "2.25")]
    assert decode(encode("cust_42", events, RECEIVED)) == events


def test_customer_comes_from_the_envelope() -> None:
    [event] = decode(encode("cust_7", [stored(customer="ignored")], RECEIVED))
    assert event.customer == "cust_7"


def test_times_keep_microseconds_and_offset() -> None:
    [event] = decode(encode("cust_42", [stored(7)], RECEIVED))
    assert event.time == datetime(2026, 11, 3, 10, 15, 0, 7, tzinfo=UTC)
    assert event.time.utcoffset() == timedelta(0)
    assert event.received_at == RECEIVED


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2999, 12, 30),
        timezones=st.just(UTC)
        | st.integers(-1439, 1439).map(lambda minutes: timezone(timedelta(minutes=minutes))),
    )
)
def test_an_events_time_travels_as_its_isoformat_and_comes_back_equal(moment: datetime) -> None:
    """The envelope leaves times to orjson (a tenth of ``isoformat``'s cost): the text
    must be ``isoformat``'s, which readers of dead letters and older code expect."""
    event = stored()._replace(time=moment)
    raw = orjson.loads(encode_shares([("cust_42", [event])], RECEIVED))
    assert raw["shares"][0]["events"][0]["time"] == moment.isoformat()
    assert decode_shares(encode_shares([("cust_42", [event])], RECEIVED))[0][1][0].time == moment


def test_from_usage_event() -> None:
    usage = UsageEvent.model_validate(
        {
            "specversion": "1.0",
            "id": "evt-1",
            "source": "gateway-eu",
            "type": "api_call",
            "subject": "cust_42",
            "time": "2026-11-03T11:15:00+01:00",
            "data": {"value": "0.000001", "status": 200},
        }
    )
    [event] = decode(encode("cust_42", [StoredEvent.from_usage(usage, RECEIVED)], RECEIVED))
    assert event == StoredEvent(
        id="evt-1",
        source="gateway-eu",
        type="api_call",
        customer="cust_42",
        time=datetime(2026, 11, 3, 10, 15, tzinfo=UTC),
        value=Decimal("0.000001"),
        dimensions={"status": "200"},
        received_at=RECEIVED,
    )


def test_empty_envelope() -> None:
    assert decode(encode("cust_42", [], RECEIVED)) == []


@pytest.mark.parametrize("version", [0, 3, "1", "2", None])
def test_decode_rejects_unknown_version(version: object) -> None:
    raw = orjson.loads(encode("cust_42", [stored()], RECEIVED))
    raw["v"] = version
    with pytest.raises(ValueError, match="unsupported envelope version"):
        decode(orjson.dumps(raw))


def test_decode_rejects_missing_version() -> None:
    raw = orjson.loads(encode("cust_42", [stored()], RECEIVED))
    del raw["v"]
    with pytest.raises(ValueError, match="unsupported envelope version"):
        decode(orjson.dumps(raw))


@pytest.mark.parametrize(
    ("count", "size", "sizes"),
    [
        (0, 500, []),
        (1, 500, [1]),
        (500, 500, [500]),
        (501, 500, [500, 1]),
        (1250, 500, [500, 500, 250]),
        (7, 3, [3, 3, 1]),
    ],
)
def test_chunks(count: int, size: int, sizes: list[int]) -> None:
    events = [stored(i) for i in range(count)]
    parts = list(chunks(events, size))
    assert [len(p) for p in parts] == sizes
    assert [e for p in parts for e in p] == events  # order kept, nothing lost


def test_chunks_default_size() -> None:
    events = [stored(i) for i in range(MAX_EVENTS_PER_ENVELOPE + 1)]
    assert [len(p) for p in chunks(events)] == [MAX_EVENTS_PER_ENVELOPE, 1]


def test_envelopes_stay_under_the_byte_limit_whatever_the_event_size() -> None:
    bulky = [
        StoredEvent(
            f"e{i}",
            "s",
            "t",
            "cust_42",
            RECEIVED,
            Decimal(1),
            {"blob": "x" * 250} | {f"d{j}": "y" * 250 for j in range(30)},
            RECEIVED,
        )
        for i in range(400)
    ]
    payloads = list(envelopes([("cust_42", bulky)], RECEIVED))
    assert len(payloads) > 1
    assert all(len(p) <= MAX_ENVELOPE_BYTES for p in payloads)
    assert [e.id for p in payloads for e in decode(p)] == [e.id for e in bulky]


def test_shares_round_trip_with_each_event_under_its_customer() -> None:
    a = [stored(0, customer="x"), stored(1, "2.5", customer="x")]
    b = [stored(2, customer="ignored", endpoint="/v1/y")]
    payload = encode_shares([("cust_a", a), ("cust_b", b)], RECEIVED)
    assert orjson.loads(payload)["v"] == 2
    shares = decode_shares(payload)
    assert [(c, [e.id for e in evs]) for c, evs in shares] == [
        ("cust_a", ["evt-0", "evt-1"]),
        ("cust_b", ["evt-2"]),
    ]
    assert shares[1][1][0] == b[0]._replace(customer="cust_b")
    assert decode(payload) == [e for _, evs in shares for e in evs]


def test_a_version_1_envelope_is_one_share() -> None:
    assert decode_shares(encode("cust_42", [stored(3)], RECEIVED)) == [("cust_42", [stored(3)])]


def test_envelopes_split_many_customers_at_the_event_limit_keeping_order() -> None:
    shares = [
        (f"c{c}", [stored(c * 1000 + i, customer=f"c{c}") for i in range(180)]) for c in range(4)
    ]
    payloads = list(envelopes(shares, RECEIVED))
    assert [len(decode(p)) for p in payloads] == [MAX_EVENTS_PER_ENVELOPE, 220]
    [first, second] = [decode_shares(p) for p in payloads]
    assert [c for c, _ in first] == ["c0", "c1", "c2"] and [c for c, _ in second] == ["c2", "c3"]
    for customer, events in shares:  # every event once, in its customer's order
        got = [e.id for p in payloads for c, evs in decode_shares(p) if c == customer for e in evs]
        assert got == [e.id for e in events]


def test_decode_refuses_naive_times() -> None:
    payload = orjson.loads(encode("cust_42", [stored(1)], RECEIVED))
    payload["events"][0]["time"] = "2026-11-03T10:15:30"
    with pytest.raises(ValueError, match="UTC offset"):
        decode(orjson.dumps(payload))


def test_a_usage_events_dimensions_and_nested_data_travel_apart() -> None:
    """A flat event's extra members are its dimensions (no data text); nested data goes
    whole as JSON, numbers exact, with only its top-level strings as dimensions."""
    common = {
        "specversion": "1.0",
        "source": "llm",
        "type": "completion",
        "subject": "cust_42",
        "time": "2026-11-03T10:15:00Z",
    }
    flat = UsageEvent.model_validate(
        common | {"id": "a", "data": {"model": "m1", "status": 200}, "tallylease": "ls_" + "x" * 16}
    )
    nested = UsageEvent.model_validate(
        common
        | {"id": "b", "data": {"value": "2.5", "model": "m1", "tokens": {"in": Decimal("1.10")}}}
    )
    assert flat.data.wire() == ({"model": "m1", "status": "200"}, "")
    a, b = decode(encode_shares([("cust_42", [flat, nested])], RECEIVED))
    assert (a.dimensions, a.data, a.lease) == ({"model": "m1", "status": "200"}, "", flat.lease)
    assert (b.dimensions, b.value, b.lease) == ({"model": "m1"}, Decimal("2.5"), "")
    assert orjson.loads(b.data) == {"value": 2.5, "model": "m1", "tokens": {"in": 1.1}}
    assert '"in":1.10' in b.data  # the number as ingest parsed it (a decimal), as sent
