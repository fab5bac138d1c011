"""The catalog: meters and plans as data, loaded from YAML into PostgreSQL.

A meter turns events of one ``event_type`` into a number per customer and window.  A
plan (``schemas.plans``) prices meters and limits how fast and how much a customer may
use them.
"""

from __future__ import annotations

from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import DIMENSION_NAME_PATTERN
from schemas.plans import Plan, check_plan

DimensionName = Annotated[str, Field(pattern=DIMENSION_NAME_PATTERN)]


class Aggregation(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MAX = "max"
    LATEST = "latest"
    UNIQUE_COUNT = "unique_count"


ADDITIVE = frozenset({Aggregation.COUNT, Aggregation.SUM})
"""Aggregations whose values add up across windows: the ones a quota can bound."""


class Meter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    description: str = ""
    event_type: Annotated[str, Field(min_length=1, max_length=128)]
    aggregation: Aggregation
    value_property: str = Field(
        default="value",
        description="`value` for count/sum/max/latest; the dimension counted by unique_count.",
    )
    group_by: tuple[DimensionName, ...] = ()
    unit: str = ""

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.aggregation is Aggregation.UNIQUE_COUNT and self.value_property == "value":
            raise ValueError("unique_count meters need value_property naming a dimension")
        if self.aggregation is not Aggregation.UNIQUE_COUNT and self.value_property != "value":
            raise ValueError(f"{self.aggregation} meters aggregate `value`")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by lists a dimension twice")
        return self


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
