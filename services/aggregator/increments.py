"""Turning one customer's new events into counter operations for the Redis sink.

Everything is pre-aggregated here so that the Lua call applying a batch does a handful
of operations however many events the batch holds.  What a meter reads from an event —
whether it counts, its number, member and group — is ``schemas.readings``, the one
definition ingest and the ClickHouse SQL agree with.  Events are first folded per meter,
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
from zoneinfo import ZoneInfo

from schemas import corrections, redis_keys
from schemas.catalog import ADDITIVE, Aggregation, Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, to_micros
from schemas.readings import Facts, Reader
from schemas.windows import RETENTION, Window, bucket_expiry, bucket_id
from schemas.zones import quota_month

WINDOWS = tuple(Window)
Cells = dict[tuple[str, int], dict[str, Any]]  # (meter, event minute) → group → partial


@dataclass(slots=True)
class CounterOps:
    """The effect of a batch on one customer's keys."""

    sums: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    maxima: dict[tuple[str, str], int] = field(default_factory=dict)
    minima: dict[tuple[str, str], int] = field(default_factory=dict)
    latest: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    # (set key, counters key, group field) → members; the Lua call counts new members
    # into the counters hash so that every aggregation reads the same way.
    members: dict[tuple[str, str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    expiry: dict[str, int] = field(default_factory=dict)
    # (lease, meter) → micro-units its events add to the meter: settled in the same call
    settle: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # month counters key → (meter, bucket: yyyymm, or yyyymm@Zone for a local quota month):
    # the totals checked against alert thresholds
    months: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.sums or self.maxima or self.minima or self.latest or self.members or self.settle
        )


def build(
    customer: str,
    events: Sequence[StoredEvent],
    meters: dict[str, list[Meter]],
    now: datetime,
    counting_from: dict[str, int] | None = None,
    tz: ZoneInfo | None = None,
) -> CounterOps:
    """The counter operations of one customer's new events.  ``counting_from`` (meter →
    catalog version) leaves out of a meter the events stamped before it counted live:
    those are the back-fill's (``schemas.envelope.StoredEvent.catalog_version``).

    A customer billed in a zone ``tz`` has its quotas over its local calendar months
    (``schemas.zones.quota_month``): additive meters also count their totals into that
    month's counters, which quotas and alerts read instead of the UTC month's."""
    readers = _readers(meters)
    ops = CounterOps()
    now_ts = int(now.timestamp())
    folded = _fold(ops, customer, now_ts, events, readers, counting_from or {})
    for (name, minute), groups in folded.items():
        meter = readers.by_name[name]
        local = tz is not None and meter.aggregation in _SETTLED
        for window, bucket, expires in _buckets(minute):
            if expires <= now_ts:
                continue  # a bucket already dropped from Redis: history is in rollups
            _spread(ops, customer, meter, window, bucket, expires, groups, quota=not local)
        if local:
            bucket, expires = _quota_bucket(minute // 60, tz)
            if expires > now_ts:
                total = {redis_keys.TOTAL: groups[redis_keys.TOTAL]}
                _spread(ops, customer, meter, Window.MONTH, bucket, expires, total, quota=True)
    return ops


@dataclass(frozen=True, slots=True)
class _Readers:
    by_type: dict[str, list[Reader]]
    by_name: dict[str, Meter]


_compiled: list[tuple[dict[str, list[Meter]], _Readers]] = []


def _readers(meters: dict[str, list[Meter]]) -> _Readers:
    """The meters compiled for reading, again only when the meters are reloaded (the
    cache replaces its index whole, so identity tells)."""
    if _compiled and _compiled[0][0] is meters:
        return _compiled[0][1]
    compiled = _Readers(
        {kind: [Reader.of(m) for m in ms] for kind, ms in meters.items()},
        {m.name: m for ms in meters.values() for m in ms},
    )
    _compiled[:] = [(meters, compiled)]
    return compiled


def _fold(
    ops: CounterOps,
    customer: str,
    now_ts: int,
    events: Iterable[StoredEvent],
    readers: _Readers,
    counting_from: dict[str, int],
) -> Cells:
    cells: Cells = {}
    for event in events:
        applicable = readers.by_type.get(event.type)
        if not applicable:
            if event.type == corrections.TYPE:
                _fold_correction(ops, customer, now_ts, cells, event, readers)
            continue
        facts = Facts(event.parsed_data(), event.value, event.dimensions)
        minute = int(event.time.timestamp()) // 60
        for reader in applicable:
            meter = reader.meter
            if event.catalog_version < counting_from.get(meter.name, 0):
                continue
            if reader.filters and not reader.matches(facts):
                continue
            read = _read(reader, facts)
            if read is None:
                continue
            if event.lease and meter.aggregation in _SETTLED:
                ops.settle[(event.lease, meter.name)] += read
            cell = cells.setdefault((meter.name, minute), {})
            for group in _groups(reader, facts):
                _fold_one(cell, group, meter.aggregation, read, event)
    return cells


_SETTLED = ADDITIVE
"""What events spent under a lease add to an additive meter becomes usage of its
holding (quotas, hence leases, are on additive meters)."""


def _fold_correction(
    ops: CounterOps,
    customer: str,
    now_ts: int,
    cells: Cells,
    event: StoredEvent,
    readers: _Readers,
) -> None:
    """A correction adds its signed delta to its meter's total and group at its minute
    (only additive meters take one: ``schemas.corrections``); a decrease is taken off
    what the corrections API holds for it, in the same call."""
    aimed = corrections.target(event.data)
    meter = readers.by_name.get(aimed.meter) if aimed else None
    if aimed is None or meter is None or meter.aggregation not in _SETTLED:
        return  # a meter archived since: its history is the rollups'
    cell = cells.setdefault((meter.name, int(event.time.timestamp()) // 60), {})
    delta = to_micros(event.value)
    fields = [redis_keys.TOTAL]
    if meter.group_names:
        values = tuple(aimed.groups.get(name, "") for name in meter.group_names)
        fields.append(_group_field(values))
    for group in fields:
        cell[group] = cell.get(group, 0) + delta
    if delta < 0:
        holds = redis_keys.correction_holds(customer)
        month = bucket_id(Window.MONTH, event.time)
        ops.sums[(holds, redis_keys.hold_field(meter.name, month, fields[-1]))] += delta
        ops.expiry[holds] = now_ts + corrections.HOLD_SECONDS


def _read(reader: Reader, facts: Facts) -> Any:
    """Micro-units of the event's number (count: one unit), its member for unique_count,
    or None when the meter does not count it."""
    if reader.meter.aggregation is Aggregation.UNIQUE_COUNT:
        return reader.member(facts)
    if reader.meter.aggregation is Aggregation.COUNT:
        return VALUE_SCALE
    number = reader.number(facts)
    return None if number is None else to_micros(number)


def _fold_one(
    cell: dict[str, Any], group: str, aggregation: Aggregation, read: Any, event: StoredEvent
) -> None:
    if aggregation in _SETTLED:
        cell[group] = cell.get(group, 0) + read
    elif aggregation is Aggregation.MAX:
        cell[group] = max(cell.get(group, -1), read)
    elif aggregation is Aggregation.MIN:
        old = cell.get(group)
        cell[group] = read if old is None else min(old, read)
    elif aggregation is Aggregation.AVG:
        total, count = cell.get(group, (0, 0))
        cell[group] = (total + read, count + VALUE_SCALE)
    elif aggregation is Aggregation.LATEST:
        at = int(event.time.timestamp() * 1_000_000)
        if at >= cell.get(group, (-1, 0))[0]:
            cell[group] = (at, read)
    else:
        cell.setdefault(group, set()).add(read)


def _spread(
    ops: CounterOps,
    customer: str,
    meter: Meter,
    window: Window,
    bucket: str,
    expires: int,
    groups: dict[str, Any],
    quota: bool = True,
) -> None:
    """``quota``: a month's counters here are those quotas and alerts read."""
    key = redis_keys.counters(customer, meter.name, window, bucket)
    ops.expiry[key] = expires
    if window is Window.MONTH and quota:
        ops.months[key] = (meter.name, bucket)
    aggregation = meter.aggregation
    for group, partial in groups.items():
        slot = (key, group)
        if aggregation in _SETTLED:
            ops.sums[slot] += partial
        elif aggregation is Aggregation.AVG:
            ops.sums[slot] += partial[0]
            ops.sums[(key, redis_keys.count_field(group))] += partial[1]
        elif aggregation is Aggregation.MAX:
            ops.maxima[slot] = max(ops.maxima.get(slot, -1), partial)
        elif aggregation is Aggregation.MIN:
            old = ops.minima.get(slot)
            ops.minima[slot] = partial if old is None else min(old, partial)
        elif aggregation is Aggregation.LATEST:
            if partial[0] >= ops.latest.get(slot, (-1, 0))[0]:
                ops.latest[slot] = partial
        else:
            unique = redis_keys.unique_set(customer, meter.name, window, bucket, group)
            ops.expiry[unique] = expires
            ops.members[(unique, key, group)] |= partial


def _groups(reader: Reader, facts: Facts) -> tuple[str, ...]:
    if not reader.group_paths:
        return (redis_keys.TOTAL,)
    return (redis_keys.TOTAL, _group_field(reader.group(facts)))


@lru_cache(maxsize=65_536)
def _group_field(values: tuple[str, ...]) -> str:
    return redis_keys.group_field(values)


@lru_cache(maxsize=4096)
def _quota_bucket(hour: int, tz: ZoneInfo) -> tuple[str, int]:
    """The bucket id and expiry of the local quota month holding an event hour."""
    month = quota_month(datetime.fromtimestamp(hour * 3600, UTC), tz)
    return month.bucket, int((month.end + RETENTION[Window.MONTH]).timestamp())


@lru_cache(maxsize=4096)
def _buckets(minute: int) -> tuple[tuple[Window, str, int], ...]:
    """Bucket ids and expiries of the four windows holding an event minute."""
    moment = datetime.fromtimestamp(minute * 60, UTC)
    return tuple(
        (w, bucket_id(w, moment), int(bucket_expiry(w, moment).timestamp())) for w in WINDOWS
    )
