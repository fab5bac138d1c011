"""Top groups: ranked by what each group adds up to, as its meter aggregates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas import redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.events import VALUE_SCALE
from services.api.usage import ranking
from services.api.usage.reader import Cells

DAY = datetime(2026, 11, 1, tzinfo=UTC)


def cells(values: dict[str, list[int]]) -> Cells:
    """Each endpoint's value per day, oldest first, as the reader finds them."""
    days = max(len(v) for v in values.values())
    starts = [DAY + timedelta(days=d) for d in range(days)]
    found: dict[datetime, dict[str, int]] = {s: {} for s in starts}
    for endpoint, per_day in values.items():
        for start, value in zip(starts, per_day, strict=False):
            found[start][redis_keys.group_field((endpoint,))] = value * VALUE_SCALE
    return Cells(starts, [*starts[1:], starts[-1] + timedelta(days=1)], found)


def meter(aggregation: Aggregation) -> Meter:
    counted = "user" if aggregation is Aggregation.UNIQUE_COUNT else "value"
    return Meter(
        name="m",
        event_type="e",
        aggregation=aggregation,
        value_property=counted,
        group_by=("endpoint",),
    )


VALUES = {"/a": [5, 1, 1], "/b": [1, 1, 3], "/c": [4, 0, 0]}


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (Aggregation.COUNT, [("/a", 7), ("/b", 5)]),
        (Aggregation.SUM, [("/a", 7), ("/b", 5)]),
        (Aggregation.UNIQUE_COUNT, [("/a", 7), ("/b", 5)]),
        (Aggregation.MAX, [("/a", 5), ("/c", 4)]),
        (Aggregation.LATEST, [("/b", 3), ("/a", 1)]),
    ],
)
def test_groups_rank_by_their_value_over_the_range(
    aggregation: Aggregation, expected: list[tuple[str, int]]
) -> None:
    found = cells(VALUES)
    totals = ranking.top(meter(aggregation), found, 2)
    assert [(t.groups["endpoint"], int(t.value)) for t in totals] == expected
    kept = found.points(meter(aggregation), True, [t.field for t in totals])
    order = [e for e, _ in expected]
    assert [p.groups["endpoint"] for p in kept if p.groups] == order * 3  # per day, rank order
    assert [p.start for p in kept] == sorted(p.start for p in kept)


def test_ties_go_to_the_group_that_sorts_first_and_limit_caps() -> None:
    totals = ranking.top(meter(Aggregation.SUM), cells({"/z": [2], "/y": [2], "/x": [1]}), 5)
    assert [t.as_json() for t in totals] == [
        {"groups": {"endpoint": "/y"}, "value": "2"},
        {"groups": {"endpoint": "/z"}, "value": "2"},
        {"groups": {"endpoint": "/x"}, "value": "1"},
    ]
