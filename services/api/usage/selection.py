"""Some of a meter's groups: a subset of its dimensions kept, others fixed to a value.

Counters are kept per combination of *all* of a meter's group dimensions.  A reader
who asks for fewer (``groupBy=model`` of a meter grouped by model and region) or for one
value of a dimension (OpenMeter's ``filterGroupBy[region]=eu``) gets the stored groups
merged: count and sum add, max and min take the extreme.  A distinct count, an average
or a latest value cannot be merged from its groups' values (the members, the counts and
the times are gone), so for those every dimension must be kept or fixed: each answer is
then exactly one stored group, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from schemas import redis_keys
from schemas.catalog import Aggregation, Meter
from services.api.usage.reader import Cells

MERGEABLE = frozenset({Aggregation.COUNT, Aggregation.SUM, Aggregation.MAX, Aggregation.MIN})


class SelectionError(ValueError):
    """A selection the meter cannot answer: ``part`` is what to name (``keep``: the
    grouping asked, ``where``: the values fixed), the message says why."""

    def __init__(self, part: str, why: str) -> None:
        super().__init__(why)
        self.part = part


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dimensions are kept (in the meter's order) and which are fixed to a value."""

    keep: tuple[str, ...]
    where: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, meter: Meter, keep: Iterable[str], where: Mapping[str, str]) -> Selection:
        """Checked against the meter; raises ``SelectionError`` naming what is wrong."""
        names = meter.group_names
        kept = set(keep)
        for part, asked in (("keep", kept), ("where", set(where))):
            for name in sorted(asked - set(names)):
                raise SelectionError(
                    part,
                    f"meter {meter.name!r} has no group {name!r}; its groups: "
                    + (", ".join(names) or "(none)"),
                )
        merged = [n for n in names if n not in kept and n not in where]
        if merged and (kept or where) and meter.aggregation not in MERGEABLE:
            raise SelectionError(
                "keep",
                f"meter {meter.name!r} ({meter.aggregation.value}) cannot merge groups:"
                f" keep or fix {', '.join(merged)} too",
            )
        return cls(tuple(n for n in names if n in kept), dict(where))

    def everything(self, meter: Meter) -> bool:
        """Does this select the meter's groups as stored (nothing to merge or drop)?"""
        return not self.where and self.keep in ((), meter.group_names)

    def narrow(self, meter: Meter, cells: Cells) -> tuple[Meter, Cells]:
        """``cells`` read grouped, narrowed to this selection, and the meter as it reads
        them: grouped by the kept dimensions only.  Each bucket holds the kept groups and
        the total over the groups that match (the stored total when nothing is fixed)."""
        found: dict[datetime, dict[str, int]] = {}
        for bucket, values in cells.found.items():
            narrowed: dict[str, int] = {}
            for group_field, value in values.items():
                if group_field == redis_keys.TOTAL:
                    continue
                groups = dict(
                    zip(meter.group_names, redis_keys.parse_group(group_field), strict=True)
                )
                if any(groups[name] != wanted for name, wanted in self.where.items()):
                    continue
                if self.keep:
                    kept = redis_keys.group_field(tuple(groups[n] for n in self.keep))
                    _merge(meter.aggregation, narrowed, kept, value)
                _merge(meter.aggregation, narrowed, redis_keys.TOTAL, value)
            if not self.where and redis_keys.TOTAL in values:
                narrowed[redis_keys.TOTAL] = values[redis_keys.TOTAL]
            found[bucket] = narrowed
        paths = dict(zip(meter.group_names, meter.group_by, strict=True))
        view = meter.model_copy(update={"group_by": tuple(paths[n] for n in self.keep)})
        return view, replace(cells, found=found)


def _merge(aggregation: Aggregation, into: dict[str, int], key: str, value: int) -> None:
    old = into.get(key)
    if old is None:
        into[key] = value
    elif aggregation is Aggregation.MAX:
        into[key] = max(old, value)
    elif aggregation is Aggregation.MIN:
        into[key] = min(old, value)
    else:  # count and sum; other aggregations never merge two groups (see ``of``)
        into[key] = old + value
