from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import jiter
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import MAX_DIMENSIONS, EventData, UsageEvent, from_micros, to_micros
from tests.support import sample_event as event


def data(**fields: Any) -> EventData:
    return EventData.model_validate(fields)


def test_valid_event() -> None:
    parsed = UsageEvent.model_validate(event())
    assert parsed.key == ("gateway-eu", "evt-1")
    assert parsed.customer == "cust_42"
    assert parsed.value == Decimal(1)
    assert parsed.dimensions == {"endpoint": "/v1/x"}


@pytest.mark.parametrize("field", ["specversion", "id", "source", "type", "subject", "time"])
def test_required_fields(field: str) -> None:
    raw = event()
    del raw[field]
    with pytest.raises(ValidationError) as info:
        UsageEvent.model_validate(raw)
    assert info.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("version", ["0.3", "1", "2.0", 1.0])
def test_specversion_must_be_1_0(version: Any) -> None:
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(event(specversion=version))


@pytest.mark.parametrize(
    "subject", ["", "cust{1}", "{cust}", "cust 42", " cust", "-cust", "c" * 129]
)
def test_bad_subject_rejected(subject: str) -> None:
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(event(subject=subject))


@pytest.mark.parametrize("subject", ["c", "Acme.Corp:eu-1", "user@example.com", "c" * 128])
def test_good_subject_accepted(subject: str) -> None:
    assert UsageEvent.model_validate(event(subject=subject)).customer == subject


def test_naive_time_rejected() -> None:
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(event(time="2026-11-03T10:15:30"))


@pytest.mark.parametrize(
    "moment",
    [1796000000, 1796000000000, 1796000000.5, "1796000000", "2026-11-03", True, None],
)
def test_time_other_than_rfc_3339_text_is_refused_naming_it(moment: Any) -> None:
    """pydantic alone would read 1796000000 as 2026-11-30T00:53:20Z (seconds since 1970,
    or milliseconds, guessed by size): CloudEvents' time is RFC 3339 text."""
    with pytest.raises(ValidationError) as info:
        UsageEvent.model_validate(event(time=moment))
    (error,) = info.value.errors()
    assert error["loc"] == ("time",)
    if moment is not None:
        assert "must be an RFC 3339 date-time" in error["msg"]


@pytest.mark.parametrize(
    "text", ["2026-11-03T10:15:30Z", "2026-11-03t10:15:30.5z", "2026-11-03 11:15:30+01:00"]
)
def test_time_in_each_rfc_3339_spelling_is_accepted(text: str) -> None:
    assert UsageEvent.model_validate(event(time=text)).time == datetime(
        2026, 11, 3, 10, 15, 30, 500000 if ".5" in text else 0, tzinfo=UTC
    )


def test_time_normalised_to_utc() -> None:
    parsed = UsageEvent.model_validate(event(time="2026-11-03T11:15:30+01:00"))
    assert parsed.time == datetime(2026, 11, 3, 10, 15, 30, tzinfo=UTC)
    assert parsed.time.utcoffset() == timedelta(0)


def test_time_from_python_datetime_normalised_to_utc() -> None:
    moment = datetime(2026, 11, 3, 5, 15, 30, tzinfo=timezone(timedelta(hours=-5)))
    parsed = UsageEvent.model_validate(event(time=moment))
    assert parsed.time.tzinfo is UTC
    assert parsed.time.hour == 10


@pytest.mark.parametrize(
    "text", ["1_000", " 1", "1 ", "1\n", "+1", ".5", "\u0661\u0660", "\uff11\uff10"]
)
def test_a_value_only_python_would_read_is_refused(text: str) -> None:
    """``Decimal("1_000")`` is 1000; JSON, and every other client's parser, says no."""
    with pytest.raises(ValidationError) as info:
        data(value=text)
    (error,) = info.value.errors()
    assert error["loc"] == ("value",) and "ASCII digits, a point, an exponent" in error["msg"]


@pytest.mark.parametrize(
    ("text", "value"), [("1e3", 1000), ("2.50", Decimal("2.5")), ("7", 7), ("007", 7), ("1.", 1)]
)
def test_a_value_as_json_writes_a_number_is_read(text: str, value: Decimal) -> None:
    assert data(value=text).value == value


def test_value_defaults_to_one() -> None:
    assert data().value == Decimal(1)
    assert UsageEvent.model_validate(event(data={"endpoint": "/x"})).value == Decimal(1)
    assert UsageEvent.model_validate({k: v for k, v in event().items() if k != "data"}).value == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2.5", "2.5"),
        ("0.000001", "0.000001"),
        ("999999999999.999999", "999999999999.999999"),
        ("1.500000000", "1.5"),
        (0, "0"),
        (42, "42"),
        (0.1, "0.1"),
        (Decimal("7.25"), "7.25"),
    ],
)
def test_value_accepted(raw: Any, expected: str) -> None:
    assert data(value=raw).value == Decimal(expected)


@pytest.mark.parametrize(
    "raw",
    [
        "1.0000001",  # 7 decimal places
        "0.0000005",
        -1,
        "-0.5",
        10**12,
        "1000000000000",
        "1e12",
        "NaN",
        "Infinity",
        "-Infinity",
        float("nan"),
        float("inf"),
        True,
        False,
        None,
        "",
        "ten",
        [1],
        {"v": 1},
    ],
)
def test_value_rejected(raw: Any) -> None:
    with pytest.raises(ValidationError):
        data(value=raw)


def test_dimension_numbers_become_strings() -> None:
    parsed = data(status=200, ratio=Decimal("0.5"), method="GET")
    assert parsed.dimensions == {"status": "200", "ratio": "0.5", "method": "GET"}


@pytest.mark.parametrize("raw", [{"a": 1}, [1, 2], [], None, True, False])
def test_nested_members_are_kept_but_are_not_dimensions(raw: Any) -> None:
    parsed = data(endpoint="/v1/x", extra=raw)
    assert parsed.dimensions == {"endpoint": "/v1/x"}
    assert parsed.nested
    assert orjson.loads(parsed.as_json()) == {"endpoint": "/v1/x", "extra": raw}


def test_flat_data_has_no_json_of_its_own() -> None:
    assert data(endpoint="/v1/x", value="2").as_json() == ""


def test_nested_numbers_are_kept_exactly() -> None:
    raw = jiter.from_json(
        b'{"value": 2, "tokens": {"input": 812, "price": 0.000001234567890123}}',
        float_mode="decimal",
    )
    text = EventData.model_validate(raw).as_json()
    assert text == '{"value":2,"tokens":{"input":812,"price":0.000001234567890123}}'


def _deep(levels: int) -> dict[str, Any]:
    """A member that makes ``data`` ``levels`` objects deep."""
    inner: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 2):
        inner = {"a": inner}
    return inner


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_deep(9), "nested deeper than 8 levels"),
        (list(range(1000)), "more than 1000 keys and values"),
        ({"k": "x" * 257}, "o.k: strings are at most 256 characters"),
        ({"": 1}, "keys are 1 to 64 characters"),
        ({"k" * 65: 1}, "keys are 1 to 64 characters"),
        ({"k\x01": 1}, "must not contain control characters"),
        ({"k": "a\nb"}, "o.k: must not contain control characters"),
        ({"k": Decimal("123456789012.123456")}, "o.k: 123456789012.123456 has more digits"),
        ({"k": [2**64]}, "o.k[0]: 18446744073709551616 is beyond 64-bit integers"),
        ({"k": -(2**63) - 1}, "is beyond 64-bit integers"),
    ],
)
def test_nested_data_is_bounded(member: Any, why: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(why)):
        data(o=member)


def test_eight_levels_counting_data_are_allowed() -> None:
    assert data(o=_deep(8)).nested


@pytest.mark.parametrize(
    "number", [2**64 - 1, -(2**63), Decimal("1.50"), Decimal("0.30000000000000004"), 1e-300]
)
def test_numbers_a_double_or_64_bit_integer_holds_are_kept(number: Any) -> None:
    assert data(o={"k": number}).nested


@pytest.mark.parametrize("name", ["Endpoint", "1st", "_x", "a-b", "a b", "é", "a" * 65])
def test_bad_dimension_names_rejected(name: str) -> None:
    with pytest.raises(ValidationError):
        data(**{name: "x"})


def test_dimension_name_with_trailing_newline_rejected() -> None:
    with pytest.raises(ValidationError):
        data(**{"endpoint\n": "x"})


def test_long_dimension_value_rejected() -> None:
    assert data(endpoint="x" * 256).dimensions["endpoint"] == "x" * 256
    with pytest.raises(ValidationError):
        data(endpoint="x" * 257)


def test_at_most_32_dimensions() -> None:
    dims = {f"d{i}": "x" for i in range(MAX_DIMENSIONS)}
    assert len(data(**dims).dimensions) == MAX_DIMENSIONS
    with pytest.raises(ValidationError):
        data(**dims, one_more="x")


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0", 0),
        ("1", 1_000_000),
        ("0.000001", 1),
        ("1.5", 1_500_000),
        ("1.500000000", 1_500_000),
        ("999999999999.999999", 999_999_999_999_999_999),
    ],
)
def test_micros(value: str, micros: int) -> None:
    assert to_micros(Decimal(value)) == micros
    assert from_micros(micros) == Decimal(value)


def test_from_micros_has_no_exponent_notation() -> None:
    assert str(from_micros(10_000_000)) == "10"
    assert str(from_micros(1_500_000)) == "1.5"
    assert str(from_micros(0)) == "0"


@given(st.integers(min_value=0, max_value=10**18 - 1))
def test_micros_round_trip(micros: int) -> None:
    value = from_micros(micros)
    assert to_micros(value) == micros
    assert from_micros(to_micros(value)) == value


@given(
    st.decimals(
        min_value=0,
        max_value=Decimal("999999999999.999999"),
        places=6,
        allow_nan=False,
        allow_infinity=False,
    )
)
def test_decimal_round_trips_through_micros(value: Decimal) -> None:
    assert data(value=value).value == value
    assert from_micros(to_micros(value)) == value
