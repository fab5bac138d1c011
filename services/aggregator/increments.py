"""Turning one customer's new events into counter operations for the Redis sink.

Everything is pre-aggregated here, per key and field, so that the Lua call applying a
batch does a handful of operations however many events the batch holds.  Values are
integers of micro-units: sums of decimals stay exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from schemas import redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, to_micros
from schemas.windows import Window, bucket_expiry, bucket_id

WINDOWS = tuple(Window)


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

    def __bool__(self) -> bool:
        return bool(self.sums or self.maxima or self.latest or self.members)


class _Buckets:
    """Bucket ids and expiries per event minute, computed once per minute per batch."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[tuple[Window, str, int], ...]] = {}

    def of(self, moment: datetime) -> tuple[tuple[Window, str, int], ...]:
        minute = int(moment.timestamp()) // 60
        cached = self._cache.get(minute)
        if cached is None:
            cached = tuple(
                (w, bucket_id(w, moment), int(bucket_expiry(w, moment).timestamp()))
                for w in WINDOWS
            )
            self._cache[minute] = cached
        return cached


def build(
    customer: str, events: Iterable[StoredEvent], meters: dict[str, list[Meter]], now: datetime
) -> CounterOps:
    ops = CounterOps()
    buckets = _Buckets()
    now_ts = int(now.timestamp())
    for event in events:
        for meter in meters.get(event.type, ()):
            groups = _groups(meter, event)
            for window, bucket, expires in buckets.of(event.time):
                if expires <= now_ts:
                    continue  # a bucket already dropped from Redis: history is in rollups
                _apply(ops, customer, meter, window, bucket, groups, event)
                for key in _keys(customer, meter, window, bucket, groups):
                    ops.expiry[key] = expires
    return ops


def _groups(meter: Meter, event: StoredEvent) -> tuple[str, ...]:
    if not meter.group_by:
        return (redis_keys.TOTAL,)
    values = tuple(event.dimensions.get(d, "") for d in meter.group_by)
    return (redis_keys.TOTAL, redis_keys.group_field(values))


def _keys(
    customer: str, meter: Meter, window: Window, bucket: str, groups: tuple[str, ...]
) -> list[str]:
    counters = redis_keys.counters(customer, meter.name, window, bucket)
    if meter.aggregation is Aggregation.UNIQUE_COUNT:
        sets = [redis_keys.unique_set(customer, meter.name, window, bucket, g) for g in groups]
        return [counters, *sets]
    return [counters]


def _apply(
    ops: CounterOps,
    customer: str,
    meter: Meter,
    window: Window,
    bucket: str,
    groups: tuple[str, ...],
    event: StoredEvent,
) -> None:
    aggregation = meter.aggregation
    key = redis_keys.counters(customer, meter.name, window, bucket)
    if aggregation is Aggregation.UNIQUE_COUNT:
        member = event.dimensions.get(meter.value_property)
        if member is None:
            return  # nothing to count distinctly
        for group in groups:
            unique = redis_keys.unique_set(customer, meter.name, window, bucket, group)
            ops.members[(unique, key, group)].add(member)
        return
    micros = to_micros(event.value)
    for group in groups:
        slot = (key, group)
        if aggregation is Aggregation.COUNT:
            ops.sums[slot] += VALUE_SCALE
        elif aggregation is Aggregation.SUM:
            ops.sums[slot] += micros
        elif aggregation is Aggregation.MAX:
            if micros > ops.maxima.get(slot, -1):
                ops.maxima[slot] = micros
        else:  # LATEST: the value of the event with the latest event time
            at = int(event.time.timestamp() * 1_000_000)
            if at >= ops.latest.get(slot, (-1, 0))[0]:
                ops.latest[slot] = (at, micros)
