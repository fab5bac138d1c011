"""Turning one customer's new events into counter operations for the Redis sink.

Everything is pre-aggregated here so that the Lua call applying a batch does a handful
of operations however many events the batch holds.  Events are first folded per meter,
event minute and group — one dict update per event — and only those cells are then
spread over the minute, hour, day and month buckets.  Values are integers of
micro-units: sums of decimals stay exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from schemas import redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, to_micros
from schemas.windows import Window, bucket_expiry, bucket_id

WINDOWS = tuple(Window)
Cells = dict[tuple[str, int], dict[str, Any]]  # (meter, event minute) → group → partial


@dataclass(slots=True)
class CounterOps:
    """The effect of a batch on one customer's keys."""

    sums: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    maxima: dict[tuple[str, str], int] = field(default_factory=dict)
    latest: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    # (set key, counters key, group field) → members; the Lua call counts new members
    # into the counters hash so that every aggregation reads the same way.
    members: dict[tuple[str, str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    expiry: dict[str, int] = field(default_factory=dict)
    # (lease, meter) → micro-units its events add to the meter: settled in the same call
    settle: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # month counters key → (meter, yyyymm): the totals checked against alert thresholds
    months: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sums or self.maxima or self.latest or self.members or self.settle)


def build(
    customer: str, events: Sequence[StoredEvent], meters: dict[str, list[Meter]], now: datetime
) -> CounterOps:
    by_name = {m.name: m for ms in meters.values() for m in ms}
    ops = CounterOps()
    _settle(ops, events, meters)
    now_ts = int(now.timestamp())
    for (name, minute), groups in _fold(events, meters).items():
        meter = by_name[name]
        for window, bucket, expires in _buckets(minute):
            if expires <= now_ts:
                continue  # a bucket already dropped from Redis: history is in rollups
            _spread(ops, customer, meter, window, bucket, expires, groups)
    return ops


def _settle(ops: CounterOps, events: Sequence[StoredEvent], meters: dict[str, list[Meter]]) -> None:
    """What events spent under a lease add to each additive meter: that much of the
    lease's holding becomes usage (quotas, hence leases, are on additive meters)."""
    for event in events:
        if not event.lease:
            continue
        for meter in meters.get(event.type, ()):
            if meter.aggregation is Aggregation.COUNT:
                ops.settle[(event.lease, meter.name)] += VALUE_SCALE
            elif meter.aggregation is Aggregation.SUM:
                ops.settle[(event.lease, meter.name)] += to_micros(event.value)


def _fold(events: Iterable[StoredEvent], meters: dict[str, list[Meter]]) -> Cells:
    cells: Cells = {}
    for event in events:
        applicable = meters.get(event.type)
        if not applicable:
            continue
        minute = int(event.time.timestamp()) // 60
        for meter in applicable:
            cell = cells.setdefault((meter.name, minute), {})
            for group in _groups(meter, event.dimensions):
                _fold_one(cell, group, meter, event)
    return cells


def _fold_one(cell: dict[str, Any], group: str, meter: Meter, event: StoredEvent) -> None:
    aggregation = meter.aggregation
    if aggregation is Aggregation.COUNT:
        cell[group] = cell.get(group, 0) + VALUE_SCALE
    elif aggregation is Aggregation.SUM:
        cell[group] = cell.get(group, 0) + to_micros(event.value)
    elif aggregation is Aggregation.MAX:
        cell[group] = max(cell.get(group, -1), to_micros(event.value))
    elif aggregation is Aggregation.LATEST:
        at = int(event.time.timestamp() * 1_000_000)
        if at >= cell.get(group, (-1, 0))[0]:
            cell[group] = (at, to_micros(event.value))
    else:
        member = event.dimensions.get(meter.value_property)
        if member is not None:
            cell.setdefault(group, set()).add(member)


def _spread(
    ops: CounterOps,
    customer: str,
    meter: Meter,
    window: Window,
    bucket: str,
    expires: int,
    groups: dict[str, Any],
) -> None:
    key = redis_keys.counters(customer, meter.name, window, bucket)
    ops.expiry[key] = expires
    if window is Window.MONTH:
        ops.months[key] = (meter.name, bucket)
    aggregation = meter.aggregation
    for group, partial in groups.items():
        slot = (key, group)
        if aggregation in (Aggregation.COUNT, Aggregation.SUM):
            ops.sums[slot] += partial
        elif aggregation is Aggregation.MAX:
            ops.maxima[slot] = max(ops.maxima.get(slot, -1), partial)
        elif aggregation is Aggregation.LATEST:
            if partial[0] >= ops.latest.get(slot, (-1, 0))[0]:
                ops.latest[slot] = partial
        else:
            unique = redis_keys.unique_set(customer, meter.name, window, bucket, group)
            ops.expiry[unique] = expires
            ops.members[(unique, key, group)] |= partial


def _groups(meter: Meter, dimensions: dict[str, str]) -> tuple[str, ...]:
    if not meter.group_by:
        return (redis_keys.TOTAL,)
    return (redis_keys.TOTAL, _group_field(tuple(dimensions.get(d, "") for d in meter.group_by)))


@lru_cache(maxsize=65_536)
def _group_field(values: tuple[str, ...]) -> str:
    return redis_keys.group_field(values)


@lru_cache(maxsize=4096)
def _buckets(minute: int) -> tuple[tuple[Window, str, int], ...]:
    """Bucket ids and expiries of the four windows holding an event minute."""
    moment = datetime.fromtimestamp(minute * 60, UTC)
    return tuple(
        (w, bucket_id(w, moment), int(bucket_expiry(w, moment).timestamp())) for w in WINDOWS
    )
