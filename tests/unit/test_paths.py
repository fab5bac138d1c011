"""Paths into event data, as meters name values, groups and filters."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import paths
from schemas.catalog import DimensionFilter, Meter


@pytest.mark.parametrize(
    ("text", "steps", "name"),
    [
        ("value", ("value",), "value"),
        ("$.model", ("model",), "model"),
        ("$.tokens.input", ("tokens", "input"), "tokens.input"),
        ("tokens.input", ("tokens", "input"), "tokens.input"),
        ("$.items[2].id", ("items", 2, "id"), "items[2].id"),
    ],
)
def test_paths_parse_to_steps_and_a_name(text: str, steps: tuple[object, ...], name: str) -> None:
    path = paths.parse(text)
    assert path.steps == steps
    assert path.name == name
    assert paths.parse(path.text) == path


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "must not be empty"),
        ("$", "whole data object"),
        ("$[0]", "starts with a name"),
        ("a..b", "expected `.name` or `[index]`"),
        ("$.a[01]", "expected `.name` or `[index]`"),
        ("$.a[*]", "expected `.name` or `[index]`"),
        ("9lives", "must start with `$` or a name"),
        ("$" + ".a" * 9, "at most 8 steps"),
    ],
)
def test_bad_paths_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("$", r"\$")):
        paths.parse(text)


def test_find_distinguishes_missing_from_null() -> None:
    data = {"tokens": {"input": 5, "cached": None}, "items": [{"id": "a"}]}
    assert paths.parse("$.tokens.input").find(data) == 5
    assert paths.parse("$.tokens.cached").find(data) is None
    assert paths.parse("$.tokens.output").find(data) is paths.MISSING
    assert paths.parse("$.items[0].id").find(data) == "a"
    assert paths.parse("$.items[1].id").find(data) is paths.MISSING
    assert paths.parse("$.tokens[0]").find(data) is paths.MISSING


def test_numbers_are_read_exactly_and_booleans_are_not_numbers() -> None:
    assert paths.as_decimal(0.1) == Decimal("0.1")
    assert paths.as_decimal("12.500") == Decimal("12.500")
    assert paths.as_decimal(7) == 7
    for no in (True, None, "ten", float("nan"), "Infinity", {"a": 1}, paths.MISSING):
        assert paths.as_decimal(no) is None


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_integers_survive_as_decimals_and_dimensions(number: int) -> None:
    assert paths.as_decimal(number) == number
    assert paths.as_dimension(number) == str(number)


def test_dimensions_are_scalars_only() -> None:
    assert paths.as_dimension(True) == "true"
    assert paths.as_dimension(200) == "200"
    assert paths.as_dimension(1.5) == "1.5"
    assert paths.as_dimension([1]) is None
    assert paths.as_dimension(None) is None


def test_filters_match_equals_in_and_prefix() -> None:
    assert DimensionFilter(equals="eu").matches("eu")
    assert not DimensionFilter(equals="eu").matches("us")
    assert DimensionFilter.model_validate({"in": ["a", "b"]}).matches("b")
    assert DimensionFilter(prefix="gpt-").matches("gpt-4o")
    assert not DimensionFilter(prefix="gpt-").matches(None)


def test_a_number_in_a_filter_matches_that_number_however_the_data_writes_it() -> None:
    """Numbers in data are dimensions in one canonical text (``number_text``); a number
    written in a filter is read the same way, a string is taken as it is."""
    data = json.loads('{"a": 1.50, "b": 15E-1, "c": 2, "d": true}')

    def at(key: str) -> str | None:
        return paths.as_dimension(paths.parse(f"$.{key}").find(data))

    halves = DimensionFilter.model_validate_json(b'{"equals": 1.50}')
    assert halves.equals == "1.5" and halves.matches(at("a")) and halves.matches(at("b"))
    twos = DimensionFilter.model_validate_json(b'{"in": [2, 3.0]}')
    assert twos.in_ == ("2", "3") and twos.matches(at("c"))
    assert DimensionFilter.model_validate_json(b'{"equals": true}').matches(at("d"))
    assert DimensionFilter(equals="1.50").equals == "1.50"  # a string: as written
    with pytest.raises(ValidationError):
        DimensionFilter.model_validate_json(b'{"equals": null}')


def test_a_meter_names_its_groups_by_path() -> None:
    meter = Meter(
        name="llm_input_tokens",
        event_type="llm_call",
        aggregation="sum",
        value_property="$.tokens.input",
        group_by=("$.model", "endpoint"),
        filters={"$.region": DimensionFilter(equals="eu")},
    )
    assert meter.group_names == ("model", "endpoint")
    assert meter.counting_definition()["value_property"] == "$.tokens.input"
    dumped = meter.model_dump(mode="json", by_alias=True)
    assert dumped["filters"] == {"$.region": {"equals": "eu"}}
    assert Meter.model_validate(dumped) == meter


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"aggregation": "count", "value_property": "$.tokens"}, "value_property must stay"),
        ({"group_by": ["model", "$.model"]}, "group_by lists a dimension twice"),
        ({"filters": {"a": {"equals": "x", "prefix": "y"}}}, "exactly one of"),
        ({"filters": {"a": {"in": []}}}, "at least 1 item"),
        ({"aggregation": "unique_count"}, "unique_count meters need"),
    ],
)
def test_incoherent_meters_are_refused(change: dict[str, object], why: str) -> None:
    body = {"name": "m", "event_type": "e", "aggregation": "sum"} | change
    with pytest.raises(ValueError, match=why):
        Meter.model_validate(body)
