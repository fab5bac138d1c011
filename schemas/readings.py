"""What a meter reads from one event: whether it counts, its value, its member, its group.

One definition for every place that counts — ingest (refusing an event a meter cannot
read), the aggregator's live counters, and the Python models tests compare ClickHouse's
SQL with — so that they cannot disagree.  The rules:

- an event feeds a meter when its type is the meter's ``event_type`` and every filter
  matches the dimension at its path (an event without it does not match);
- count meters count 1; a meter whose ``value_property`` is the legacy ``value`` reads
  the event's ``value`` (1 when absent); any other path must find a number from 0 to
  10^12, else the event does not count in that meter (ingest refuses such events up
  front); counters keep 6 decimal places (``schemas.events.to_micros`` truncates);
- unique_count counts the dimension at its path; an event without one adds no member;
- a group is the dimension at each ``group_by`` path, ``""`` where there is none.

A flat event (``data`` without nested members, kept as ``value`` and ``dimensions``)
is read through the same paths: a top-level name finds its dimension, deeper paths
find nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from schemas import paths
from schemas.catalog import Aggregation, DimensionFilter, Meter
from schemas.events import MAX_VALUE

LEGACY_VALUE = "value"


class Facts(NamedTuple):
    """One event as meters see it: ``data`` parsed (None for flat data), value, dimensions.

    A named tuple: the aggregator makes one per event it counts, and a frozen dataclass
    costs twice as much to build."""

    data: Mapping[str, Any] | None
    value: Decimal
    dimensions: Mapping[str, str]

    def find(self, path: paths.DataPath) -> Any:
        if self.data is not None:
            return path.find(self.data)
        name = path.top_level
        if name is None:
            return paths.MISSING
        return self.dimensions.get(name, paths.MISSING)


@dataclass(frozen=True, slots=True)
class Reader:
    """A meter compiled for reading events: paths parsed once, not per event."""

    meter: Meter
    value_path: paths.DataPath | None  # None: count, or the legacy `value`
    group_paths: tuple[paths.DataPath, ...]
    filters: tuple[tuple[paths.DataPath, DimensionFilter], ...]
    # The group's top-level names when every group path is one: a flat event's group is
    # then read straight from its dimensions (the aggregator's common case).
    flat_groups: tuple[str, ...] | None

    @classmethod
    def of(cls, meter: Meter) -> Reader:
        legacy = meter.value_property == LEGACY_VALUE
        reads_path = meter.aggregation is not Aggregation.COUNT and not legacy
        return cls(
            meter=meter,
            value_path=meter.value_path if reads_path else None,
            group_paths=meter.group_paths,
            filters=tuple((paths.parse(p), f) for p, f in meter.filters.items()),
            flat_groups=_top_level_names(meter.group_paths),
        )

    def matches(self, facts: Facts) -> bool:
        return all(f.matches(paths.as_dimension(facts.find(p))) for p, f in self.filters)

    def number(self, facts: Facts) -> Decimal | None:
        """The value a numeric meter aggregates (count: 1), or None: not counted here."""
        if self.meter.aggregation is Aggregation.COUNT:
            return Decimal(1)
        if self.value_path is None:
            return facts.value
        number = paths.as_decimal(facts.find(self.value_path))
        if number is None or not 0 <= number < MAX_VALUE:
            return None
        return number

    def member(self, facts: Facts) -> str | None:
        """What a unique_count meter counts distinct values of."""
        assert self.value_path is not None
        return paths.as_dimension(facts.find(self.value_path))

    def group(self, facts: Facts) -> tuple[str, ...]:
        if facts.data is None and self.flat_groups is not None:
            dimensions = facts.dimensions  # strings already: as_dimension keeps them
            return tuple(dimensions.get(name, "") for name in self.flat_groups)
        return tuple(paths.as_dimension(facts.find(p)) or "" for p in self.group_paths)

    def missing_number(self, facts: Facts) -> str | None:
        """Why this meter cannot read the event, when it needs a number and finds none."""
        if self.value_path is None or self.meter.aggregation is Aggregation.UNIQUE_COUNT:
            return None
        if not self.matches(facts) or self.number(facts) is not None:
            return None
        return f"meter {self.meter.name} needs a number from 0 to 10^12 at {self.value_path.text}"


def _top_level_names(group_paths: tuple[paths.DataPath, ...]) -> tuple[str, ...] | None:
    names = tuple(p.top_level for p in group_paths)
    return None if None in names else tuple(n for n in names if n is not None)
