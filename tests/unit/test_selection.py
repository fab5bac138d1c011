"""Narrowing a meter's groups: merged where they can be, refused where they cannot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas import redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.events import VALUE_SCALE
from services.api.usage.reader import Cells
from services.api.usage.selection import Selection, SelectionError

DAY = datetime(2026, 12, 1, tzinfo=UTC)


def _meter(aggregation: Aggregation) -> Meter:
    value = "value" if aggregation is Aggregation.COUNT else "$.x"
    return Meter(
        name="m",
        event_type="t",
        aggregation=aggregation,
        value_property=value,
        group_by=("$.model", "region"),
    )


def _cells(values: dict[tuple[str, str], int], total: int) -> Cells:
    found = {redis_keys.group_field(g): v * VALUE_SCALE for g, v in values.items()}
    found[redis_keys.TOTAL] = total * VALUE_SCALE
    return Cells([DAY], [DAY + timedelta(days=1)], {DAY: found})


GROUPS = {("gpt", "eu"): 3, ("gpt", "us"): 7, ("claude", "eu"): 5}


@pytest.mark.parametrize(
    ("aggregation", "by_model", "eu_total"),
    [
        (Aggregation.SUM, {"gpt": 10, "claude": 5}, 8),
        (Aggregation.COUNT, {"gpt": 10, "claude": 5}, 8),
        (Aggregation.MAX, {"gpt": 7, "claude": 5}, 5),
        (Aggregation.MIN, {"gpt": 3, "claude": 5}, 3),
    ],
)
def test_kept_groups_merge_the_others(
    aggregation: Aggregation, by_model: dict[str, int], eu_total: int
) -> None:
    meter = _meter(aggregation)
    view, cells = Selection.of(meter, ["model"], {}).narrow(meter, _cells(GROUPS, 99))
    assert view.group_names == ("model",) and view.aggregation is aggregation
    points = cells.points(view, grouped=True)
    assert {p.groups["model"]: p.value for p in points if p.groups} == by_model
    assert cells.found[DAY][redis_keys.TOTAL] == 99 * VALUE_SCALE  # nothing fixed: as stored
    _, eu = Selection.of(meter, [], {"region": "eu"}).narrow(meter, _cells(GROUPS, 99))
    assert eu.points(meter, grouped=False)[0].value == eu_total


def test_a_distinct_count_is_never_merged_but_answers_one_group() -> None:
    meter = _meter(Aggregation.UNIQUE_COUNT)
    with pytest.raises(SelectionError, match="keep or fix region too") as refused:
        Selection.of(meter, ["model"], {})
    assert refused.value.part == "keep"
    selection = Selection.of(meter, ["model"], {"region": "us"})
    view, cells = selection.narrow(meter, _cells(GROUPS, 11))
    [point] = cells.points(view, grouped=True)
    assert (point.groups, point.value) == ({"model": "gpt"}, Decimal(7))


def test_unknown_groups_name_their_part() -> None:
    meter = _meter(Aggregation.SUM)
    with pytest.raises(SelectionError, match="has no group 'colour'") as refused:
        Selection.of(meter, [], {"colour": "red"})
    assert refused.value.part == "where"
    assert Selection.of(meter, ["region", "model"], {}).everything(meter)
    assert Selection.of(meter, [], {}).everything(meter)
