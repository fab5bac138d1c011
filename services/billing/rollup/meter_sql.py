"""A meter as ClickHouse SQL over the raw ``events``: what rollups and invoices count.

It must count what the live counters count, to the last digit, so it is written from
the same rules (``schemas.readings``): a path into ``data`` (the JSON text kept for
events with nested members) or, for an event stored flat (``data = ''``), the top-level
dimension of that name; numbers from 0 to 10^12 truncated to 6 places; an event whose
number (or unique member) is missing does not count; filters compare the dimension's
text.  Path steps and filter values are bound parameters, never pasted into SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas import corrections, paths
from schemas.catalog import Aggregation, DimensionFilter, Meter
from schemas.readings import LEGACY_VALUE

_NUMBERS = "('Int64', 'UInt64', 'Double')"
_SCALARS = "('Int64', 'UInt64', 'Double', 'Bool')"


@dataclass(slots=True)
class MeterSql:
    """The pieces of a meter's query: its aggregate, its group expressions, the predicate
    an event must meet to count, and the parameters all of them use."""

    value: str
    groups: list[str]
    counted: str
    params: dict[str, Any] = field(default_factory=dict)


def meter_sql(meter: Meter) -> MeterSql:
    built = _Builder()
    conditions = ["type = {type:String}"]
    built.params["type"] = meter.event_type
    for path, only in meter.filters.items():
        conditions.append(built.filter(paths.parse(path), only))
    if meter.aggregation in _ADDITIVE:
        return _additive(meter, built, conditions)
    value = _aggregate(meter, built, conditions)
    groups = [f"coalesce({built.dimension(p)}, '')" for p in meter.group_paths]
    return MeterSql(value, groups, " AND ".join(conditions), built.params)


_ADDITIVE = (Aggregation.SUM, Aggregation.COUNT)
_CORRECTION = "type = {correction_type:String}"


def _additive(meter: Meter, built: _Builder, conditions: list[str]) -> MeterSql:
    """A sum or count, corrections included (``schemas.corrections``): events of their
    own type naming the meter, whose signed ``value`` is the change and whose ``data``
    names the groups.  Only ingest writes that type: emitters may not."""
    if meter.aggregation is Aggregation.COUNT:
        each = "toDecimal128(1, 6)"
    elif meter.value_property == LEGACY_VALUE:
        each = "value"
    else:
        each = built.number(meter.value_path)
        conditions.append(f"{each} IS NOT NULL")
    built.params |= {"correction_type": corrections.TYPE, "correction_meter": meter.name}
    groups = []
    for index, (name, path) in enumerate(zip(meter.group_names, meter.group_paths, strict=True)):
        built.params[f"correction_group{index}"] = name
        named = f"JSONExtractString(data, 'groups', {{correction_group{index}:String}})"
        groups.append(f"if({_CORRECTION}, {named}, coalesce({built.dimension(path)}, ''))")
    counted = (
        f"(({' AND '.join(conditions)}) OR ({_CORRECTION}"
        " AND JSONExtractString(data, 'meter') = {correction_meter:String}))"
    )
    return MeterSql(f"sum(if({_CORRECTION}, value, {each}))", groups, counted, built.params)


def _aggregate(meter: Meter, built: _Builder, conditions: list[str]) -> str:
    """A maximum, minimum, latest value, average or distinct count (no corrections)."""
    aggregation = meter.aggregation
    if aggregation is Aggregation.UNIQUE_COUNT:
        member = built.dimension(meter.value_path)
        conditions.append(f"{member} IS NOT NULL")
        return f"toDecimal128(uniqExact({member}), 6)"
    if meter.value_property == LEGACY_VALUE:
        number = "value"
    else:
        number = built.number(meter.value_path)
        conditions.append(f"{number} IS NOT NULL")
    match aggregation:
        case Aggregation.MAX:
            return f"max({number})"
        case Aggregation.MIN:
            return f"min({number})"
        case Aggregation.LATEST:
            return f"argMax({number}, time)"
        case _:  # avg: truncated to 6 places, as the live counters divide
            return f"sum({number}) / toDecimal128(count(), 6)"


class _Builder:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def _steps(self, path: paths.DataPath) -> str:
        """The path's steps as JSONExtract arguments (array indexes count from 1 there)."""
        args = []
        for step in path.steps:
            name = f"s{len(self.params)}"
            if isinstance(step, str):
                self.params[name] = step
                args.append(f"{{{name}:String}}")
            else:
                self.params[name] = step + 1
                args.append(f"{{{name}:Int64}}")
        return ", ".join(args)

    def _flat(self, path: paths.DataPath) -> str:
        """What a path finds in an event stored flat: its top-level dimension, or NULL."""
        if path.top_level is None:
            return "NULL"
        name = f"d{len(self.params)}"
        self.params[name] = path.top_level
        return (
            f"if(mapContains(dimensions, {{{name}:String}}), dimensions[{{{name}:String}}], NULL)"
        )

    def dimension(self, path: paths.DataPath) -> str:
        """The dimension text at ``path`` (``paths.as_dimension``), NULL where none."""
        steps = self._steps(path)
        kind = f"JSONType(data, {steps})"
        return (
            f"multiIf(data = '', {self._flat(path)},"
            f" {kind} = 'String', JSONExtractString(data, {steps}),"
            f" {kind} IN {_SCALARS}, JSONExtractRaw(data, {steps}),"
            " NULL)"
        )

    def number(self, path: paths.DataPath) -> str:
        """The number at ``path`` (``paths.as_decimal``, bounded), NULL where none."""
        steps = self._steps(path)
        kind = f"JSONType(data, {steps})"
        pattern = f"n{len(self.params)}"
        self.params[pattern] = paths.NUMERIC_STRING
        text = (
            f"multiIf(data = '', {self._flat(path)},"
            f" {kind} = 'String', JSONExtractString(data, {steps}),"
            f" {kind} IN {_NUMBERS}, JSONExtractRaw(data, {steps}),"
            " NULL)"
        )
        text = f"if(match({text}, {{{pattern}:String}}), {text}, NULL)"
        number = f"toDecimal128OrNull({text}, 6)"
        return f"if({number} >= 0 AND {number} < toDecimal128(1000000000000, 6), {number}, NULL)"

    def filter(self, path: paths.DataPath, only: DimensionFilter) -> str:
        dimension = self.dimension(path)
        name = f"f{len(self.params)}"
        if only.equals is not None:
            self.params[name] = only.equals
            return f"{dimension} = {{{name}:String}}"
        if only.in_ is not None:
            self.params[name] = list(only.in_)
            return f"has({{{name}:Array(String)}}, {dimension})"
        self.params[name] = only.prefix
        return f"startsWith({dimension}, {{{name}:String}})"
