"""Minute and hour buckets read in UTC and shown in a customer's zone: found by their
UTC starts, stamped with the zone's offset — the repeated hour of a fall-back night
included, whose two 01:00s are one equal ``datetime`` in the zone and equal to neither
UTC hour."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from schemas import redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.events import VALUE_SCALE
from services.api.usage import ranking
from services.api.usage.reader import Cells

NEW_YORK = ZoneInfo("America/New_York")
FIRST = datetime(2025, 11, 2, 4, tzinfo=UTC)  # midnight in New York; 01:00 comes twice
METER = Meter(
    name="m", event_type="e", aggregation=Aggregation.SUM, value_property="value",
    group_by=("endpoint",),
)  # fmt: skip


def hours(values: list[int]) -> Cells:
    starts = [FIRST + timedelta(hours=h) for h in range(len(values))]
    found = {
        start: {
            redis_keys.TOTAL: v * VALUE_SCALE,
            redis_keys.group_field(("/a",)): v * VALUE_SCALE,
        }
        for start, v in zip(starts, values, strict=True)
    }
    return Cells(starts, [*starts[1:], starts[-1] + timedelta(hours=1)], found)


def test_the_repeated_hour_keeps_its_values_and_its_own_offsets() -> None:
    utc = hours([1, 2, 3, 4]).rows(METER, False)  # stamps remembered in UTC first
    shown = hours([1, 2, 3, 4]).shown_in(NEW_YORK).rows(METER, False)
    assert [(p["start"], p["end"], p["value"]) for p in shown] == [
        ("2025-11-02T00:00:00-04:00", "2025-11-02T01:00:00-04:00", "1"),
        ("2025-11-02T01:00:00-04:00", "2025-11-02T01:00:00-05:00", "2"),
        ("2025-11-02T01:00:00-05:00", "2025-11-02T02:00:00-05:00", "3"),
        ("2025-11-02T02:00:00-05:00", "2025-11-02T03:00:00-05:00", "4"),
    ]
    assert [p["start"] for p in utc] == [f"2025-11-02T0{h}:00:00+00:00" for h in (4, 5, 6, 7)]


def test_a_ranking_in_a_zone_counts_the_repeated_hour() -> None:
    cells = hours([1, 2, 3, 4]).shown_in(NEW_YORK)
    [top] = ranking.top(METER, cells, 1)
    assert top.value == 10
    grouped = cells.rows(METER, True, [top.field])
    assert [p["value"] for p in grouped] == ["1", "2", "3", "4"]
