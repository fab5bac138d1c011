"""The Redis sink: one atomic Lua call per customer and batch, guarded by Kafka offsets.

The call checks the batch's event digests against the de-duplication window, applies
its counter operations, marks the digests as seen, settles the enforcement reservations
the events close and the lease units they spent (so usage + held never counts an event
twice or not at all) and
records the partition offset it reached — all or nothing.  It refuses to run unless the
stored offset is still the one the batch was computed against (compare-and-set), so a
replay after a crash, or a stale worker after a rebalance, can never count twice.
When some digests were already seen (client retries) it applies nothing and names
them; the caller drops those events and calls again.  Duplicates are rare, so a batch
usually costs one round trip.

The same call evaluates the customer's alert thresholds against each month total it
changed and queues what crossed (``schemas.alerts``): inside the offset guard, a replay
or a duplicate can never fire a threshold twice.  Its reply says how many crossings wait
to be published (plus one when the customer's whole-invoice spend alerts are marked for
billing to evaluate: the call bumps that mark when it changes a month total of a customer
with such rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

from redis.asyncio import Redis

from schemas import lua, redis_keys
from schemas.alerts import SPEND_FIELD
from schemas.events import VALUE_SCALE
from services.aggregator.increments import CounterOps

OFFSETS_TTL_SECONDS = 45 * 24 * 3600

_APPLY = redis_keys.RELEASE_LUA + lua.source(
    "apply_batch",
    SCALE=str(VALUE_SCALE),
    TIME_SUFFIX=redis_keys.TIME_SUFFIX,
    FIRED_TTL=str(redis_keys.FIRED_TTL_SECONDS),
    SPEND_FIELD=SPEND_FIELD,
)


@dataclass(frozen=True, slots=True)
class Apply:
    """One customer's share of a batch, ready to send."""

    customer: str
    offset_field: str
    expected: int | None
    new_offset: int
    seen_keys: list[str]  # the live de-duplication sets, the current bucket first
    seen_expires_at: int
    digests: list[bytes]
    ops: CounterOps
    events: int = 0  # events in the share, duplicates included (for metrics)
    replayed: int = 0  # records skipped as already applied (for metrics)


class Outcome(Enum):
    APPLIED = 1
    OFFSET_MOVED = 0
    DUPLICATES = 2
    OVERFLOW = 3


class Reply(NamedTuple):
    outcome: Outcome
    seen: set[bytes]  # DUPLICATES: the digests already counted
    crossings: int = 0  # alert crossings waiting in the out list, +1 for a spend mark


class RedisSink:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_APPLY)
        self._counted: set[str] = set()  # meters this process has marked counted

    async def stored_offsets(self, wanted: list[tuple[str, str]]) -> list[int | None]:
        """The applied offset of each (customer, offset field)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for customer, field in wanted:
                pipe.hget(redis_keys.offsets(customer), field)
            raw = await pipe.execute()
        return [int(v) if v is not None else None for v in raw]

    async def apply(self, batch: list[Apply]) -> list[Reply]:
        """Try each customer's share; for refused ones, say why (and which digests)."""
        first = {meter for item in batch for meter, _ in item.ops.months.values()}
        first -= self._counted
        async with self._redis.pipeline(transaction=False) as pipe:
            if first:  # before the calls that count them: never counted yet unmarked
                pipe.sadd(redis_keys.COUNTED_METERS, *sorted(first))
            for item in batch:
                keys, args = _arguments(item)
                await self._script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        self._counted |= first
        return [_reply(r) for r in (results[1:] if first else results)]


def _reply(raw: list[Any]) -> Reply:
    seen = set(raw[1]) if len(raw) > 1 else set()
    return Reply(Outcome(int(raw[0])), seen, int(raw[2]) if len(raw) > 2 else 0)


def _arguments(item: Apply) -> tuple[list[str], list[bytes | str | int]]:
    ops = item.ops
    touched = list(ops.expiry)
    first = 9 + len(item.seen_keys)
    index = {key: position + first for position, key in enumerate(touched)}
    args: list[bytes | str | int] = [
        item.offset_field,
        "" if item.expected is None else str(item.expected),
        str(item.new_offset),
        item.seen_expires_at,
        OFFSETS_TTL_SECONDS,
        redis_keys.DIGEST_BYTES,
        len(item.seen_keys),
        b"".join(item.digests),
        "\n".join(f"{index[key]} {meter} {month}" for key, (meter, month) in ops.months.items()),
        *(ops.expiry[key] for key in touched),
    ]
    for (key, field), value in ops.sums.items():
        args += ["I", index[key], field, value, ""]
    for (key, field), value in ops.maxima.items():
        args += ["M", index[key], field, value, ""]
    for (key, field), value in ops.minima.items():
        args += ["N", index[key], field, value, ""]
    for (key, field), (at, value) in ops.latest.items():
        args += ["L", index[key], field, value, at]
    for (unique, counters, field), members in ops.members.items():
        for member in members:
            args += ["U", index[unique], field, member, index[counters]]
    for (lease, meter), value in ops.settle.items():
        args += ["S", 2, lease, value, meter]  # key 2: the reservations hash, as read
    customer = item.customer
    keys = [
        redis_keys.offsets(customer),
        redis_keys.reservations(customer),
        redis_keys.reservation_expiries(customer),
        redis_keys.held(customer),
        redis_keys.alerts(customer),
        redis_keys.alerts_fired(customer),
        redis_keys.alerts_out(customer),
        redis_keys.spend_mark(customer),
        *item.seen_keys,
        *touched,
    ]
    return keys, args
