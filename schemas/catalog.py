"""The catalog: meters and plans as data, seeded from YAML into PostgreSQL.

A meter turns events of one ``event_type`` into a number per customer and window: it
reads one value per event at ``value_property`` (a path into ``data``, see
``schemas.paths``), counts only events whose ``filters`` match, and keeps a number per
group of ``group_by`` paths.  One event may feed several meters (an LLM call: input
tokens, output tokens, requests).  A plan (``schemas.plans``) prices meters and limits
how fast and how much a customer may use them.
"""

from __future__ import annotations

from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)

from schemas import paths
from schemas.plans import Plan, check_plan

MAX_GROUP_BY = 8
MAX_FILTERS = 10
MAX_FILTER_VALUES = 100


def _path(text: str) -> str:
    paths.parse(text)  # raises ValueError naming what is wrong
    return text


MeterPath = Annotated[
    str,
    AfterValidator(_path),
    Field(
        max_length=paths.MAX_PATH_LENGTH,
        description="A path into the event's data: `$.tokens.input`, `$.model`, or a bare"
        " top-level name (`endpoint`).",
        examples=["$.tokens.input", "model"],
    ),
]


def _as_dimension(value: Any) -> Any:
    """A number or boolean in a filter reads as it does as a dimension
    (``paths.as_dimension``): ``1.50`` matches data holding ``1.5`` or ``15E-1``, ``true``
    data holding ``true``.  A string is matched as it is."""
    if isinstance(value, str):
        return value
    return paths.as_dimension(value) or value


FilterValue = Annotated[
    str,
    BeforeValidator(_as_dimension),
    Field(min_length=1, max_length=256),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": 256},
                {"type": "number"},
                {"type": "boolean"},
            ],
            "description": "a string, matched as it is; a number or boolean, matched as "
            "that value reads as a dimension (1.50 matches 1.5)",
        }
    ),
]


class Aggregation(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MAX = "max"
    LATEST = "latest"
    UNIQUE_COUNT = "unique_count"
    AVG = "avg"
    MIN = "min"


NUMERIC = frozenset(
    {Aggregation.SUM, Aggregation.AVG, Aggregation.MIN, Aggregation.MAX, Aggregation.LATEST}
)
"""Aggregations of a number read at ``value_property``."""
ADDITIVE = frozenset({Aggregation.COUNT, Aggregation.SUM})
"""Aggregations whose values add up across windows: the ones a quota can bound."""


class DimensionFilter(BaseModel):
    """Which values of one dimension a meter counts: exactly one of ``equals``, ``in``
    or ``prefix``.  An event without the dimension (or with an object, array or null
    there) does not match."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    equals: FilterValue | None = None
    in_: tuple[FilterValue, ...] | None = Field(
        None, alias="in", min_length=1, max_length=MAX_FILTER_VALUES
    )
    prefix: FilterValue | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        given = [op for op in ("equals", "in_", "prefix") if getattr(self, op) is not None]
        if len(given) != 1:
            raise ValueError("a filter has exactly one of `equals`, `in`, `prefix`")
        return self

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``{"in": [...]}``, not ``{"equals": null, "in": [...], "prefix": null}``."""
        return {k: v for k, v in handler(self).items() if v is not None}

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.equals is not None:
            return value == self.equals
        if self.in_ is not None:
            return value in self.in_
        assert self.prefix is not None
        return value.startswith(self.prefix)


class Meter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    description: str = Field("", max_length=1000)
    event_type: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
    aggregation: Aggregation
    value_property: MeterPath = Field(
        default="value",
        description="Where each event's value is: a number for sum/avg/min/max/latest, the"
        " counted member for unique_count; count ignores it (it must stay `value`).",
    )
    group_by: tuple[MeterPath, ...] = Field(
        (),
        max_length=MAX_GROUP_BY,
        description="Paths whose values split the meter into groups; a group is reported"
        " under each path's name (`$.model` → `model`).",
    )
    filters: dict[MeterPath, DimensionFilter] = Field(
        default_factory=dict,
        max_length=MAX_FILTERS,
        description="Only events whose value at each path matches are counted.",
    )
    unit: str = Field("", max_length=64)

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.aggregation is Aggregation.UNIQUE_COUNT and self.value_property == "value":
            raise ValueError("unique_count meters need value_property naming a dimension")
        if self.aggregation is Aggregation.COUNT and self.value_property != "value":
            raise ValueError("count meters count events: value_property must stay `value`")
        names = [paths.parse(p).name for p in self.group_by]
        if len(set(names)) != len(names):
            raise ValueError("group_by lists a dimension twice")
        filtered = [paths.parse(p).name for p in self.filters]
        if len(set(filtered)) != len(filtered):
            raise ValueError("filters name a dimension twice")
        return self

    @property
    def value_path(self) -> paths.DataPath:
        return paths.parse(self.value_property)

    @property
    def group_paths(self) -> tuple[paths.DataPath, ...]:
        return tuple(paths.parse(p) for p in self.group_by)

    @property
    def group_names(self) -> tuple[str, ...]:
        """The keys groups are reported under: each ``group_by`` path's name."""
        return tuple(p.name for p in self.group_paths)

    def counting_definition(self) -> dict[str, Any]:
        """What decides which events count and how: changing any of it would rewrite the
        meter's history (``group_by``, ``description`` and ``unit`` do not)."""
        return {
            "event_type": self.event_type,
            "aggregation": self.aggregation.value,
            "value_property": self.value_path.text,
            "filters": {
                paths.parse(p).text: f.model_dump(mode="json", by_alias=True)
                for p, f in sorted(self.filters.items())
            },
        }


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meters: list[Meter]
    plans: list[Plan] = []

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        names = [m.name for m in self.meters]
        if len(set(names)) != len(names):
            raise ValueError("meter names must be unique")
        plan_ids = [p.id for p in self.plans]
        if len(set(plan_ids)) != len(plan_ids):
            raise ValueError("plan ids must be unique")
        additive = {m.name for m in self.meters if m.aggregation in ADDITIVE}
        for plan in self.plans:
            check_plan(plan, set(names), additive, set(plan_ids))
        return self

    @classmethod
    def from_yaml(cls, text: str) -> Catalog:
        return cls.model_validate(yaml.safe_load(text))

    @classmethod
    def from_file(cls, path: Path) -> Catalog:
        return cls.from_yaml(path.read_text())

    @classmethod
    def default(cls) -> Catalog:
        return cls.from_yaml(
            resources.files("schemas").joinpath("catalog/default.yaml").read_text()
        )
