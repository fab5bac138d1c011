"""Tally's meters and usage points in OpenMeter's JSON shapes (its ``Meter`` and
``MeterQueryResult``), read by the ``openmeter`` SDK's generated models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from schemas import redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.events import from_micros
from schemas.readings import LEGACY_VALUE
from schemas.windows import Window
from services.api.usage.reader import Cells, Point, group_names


class OpenMeterMeter(BaseModel):
    """OpenMeter's ``Meter``, as its SDK reads it (documented here; built by ``meter``)."""

    model_config = ConfigDict(populate_by_name=True)

    id: str
    slug: str
    name: str
    description: str | None = None
    aggregation: str = Field(description="COUNT, SUM, AVG, MIN, MAX, LATEST or UNIQUE_COUNT")
    event_type: str = Field(alias="eventType")
    value_property: str | None = Field(None, alias="valueProperty")
    group_by: dict[str, str] = Field(alias="groupBy")
    created_at: str = Field(alias="createdAt")
    updated_at: str = Field(alias="updatedAt")


class QueryRow(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    value: float = Field(description="An exact decimal, written as a JSON number.")
    window_start: str = Field(alias="windowStart")
    window_end: str = Field(alias="windowEnd")
    subject: str
    group_by: dict[str, str] = Field(alias="groupBy")


class QueryResult(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    window_size: str | None = Field(None, alias="windowSize")
    data: list[QueryRow]


WINDOW_SIZES = {
    "MINUTE": Window.MINUTE,
    "HOUR": Window.HOUR,
    "DAY": Window.DAY,
    "MONTH": Window.MONTH,
}


def meter(found: Meter, created_at: datetime, updated_at: datetime) -> dict[str, Any]:
    """A meter as OpenMeter lists it: the slug is Tally's name, groups named by path."""
    shaped: dict[str, Any] = {
        "id": found.name,
        "slug": found.name,
        "name": found.name,
        "description": found.description or None,
        "aggregation": found.aggregation.value.upper(),
        "eventType": found.event_type,
        "groupBy": {p.name: p.text for p in found.group_paths},
        "createdAt": stamp(created_at),
        "updatedAt": stamp(updated_at),
    }
    if found.aggregation is not Aggregation.COUNT:
        path = found.value_path
        shaped["valueProperty"] = "$.value" if found.value_property == LEGACY_VALUE else path.text
    return shaped


def rows(points: list[Point], subject: str) -> list[dict[str, Any]]:
    return [
        {
            "value": orjson.Fragment(str(p.value)),  # exact digits; OpenMeter reads a number
            "windowStart": stamp(p.start),
            "windowEnd": stamp(p.end),
            "subject": subject,
            "groupBy": p.groups or {},
        }
        for p in points
    ]


def folded(
    meter: Meter, cells: Cells, start: datetime, end: datetime, grouped: bool, subject: str
) -> list[dict[str, Any]]:
    """The range's windows folded into one row per group (OpenMeter without a window
    size); no row for a group without usage, as OpenMeter answers."""
    by_field: dict[str, list[int]] = {}
    for bucket in cells.starts:  # oldest first
        for field, value in cells.found.get(bucket, {}).items():
            if (field == redis_keys.TOTAL) != grouped:
                by_field.setdefault(field, []).append(value)
    return [
        {
            "value": orjson.Fragment(str(from_micros(_fold(meter.aggregation, values)))),
            "windowStart": stamp(start),
            "windowEnd": stamp(end),
            "subject": subject,
            "groupBy": group_names(meter, field) if grouped else {},
        }
        for field, values in sorted(by_field.items())
    ]


def _fold(aggregation: Aggregation, values: list[int]) -> int:
    """A group's windows (micro-units) as one value, as the meter aggregates."""
    if aggregation in (Aggregation.COUNT, Aggregation.SUM):
        return sum(values)
    if aggregation is Aggregation.MAX:
        return max(values)
    if aggregation is Aggregation.MIN:
        return min(values)
    return values[-1]  # latest: the newest window's


FOLDABLE = frozenset(
    {Aggregation.COUNT, Aggregation.SUM, Aggregation.MAX, Aggregation.MIN, Aggregation.LATEST}
)


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
