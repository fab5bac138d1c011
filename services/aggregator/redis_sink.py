"""The Redis sink: one atomic Lua call per customer and batch, guarded by Kafka offsets.

The call checks the batch's event digests against the de-duplication window, applies
its counter operations, marks the digests as seen, settles the enforcement reservations
the events close (so usage + held never counts an event twice or not at all) and
records the partition offset it reached — all or nothing.  It refuses to run unless the
stored offset is still the one the batch was computed against (compare-and-set), so a
replay after a crash, or a stale worker after a rebalance, can never count twice.
When some digests were already seen (client retries) it applies nothing and names
them; the caller drops those events and calls again.  Duplicates are rare, so a batch
usually costs one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from redis.asyncio import Redis

from schemas import redis_keys
from schemas.events import VALUE_SCALE
from services.aggregator.increments import CounterOps

OFFSETS_TTL_SECONDS = 45 * 24 * 3600

# KEYS: offsets hash, the reservations hash, their expiries, the held totals, the live
#       de-duplication sets (the current bucket first), then every counter/unique key
#       the ops touch.
# ARGV: offset field, expected offset ('' = none yet), new offset, seen-set expire-at,
#       offsets ttl, digest size, n live sets, the digests concatenated (one argument:
#       cheap to send), expire-at per touched key,
#       then ops as (code, key index, field, value, extra) quintuples.
_APPLY = (
    redis_keys.RELEASE_LUA
    + """
local SCALE = @SCALE@
local LIMIT = 9.0e18  -- below 2^63 by more than a double's rounding error there
local function gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return {0} end
local size, live, blob = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local first_op = 9 + #KEYS - 4 - live
for i = first_op, #ARGV, 5 do
  if ARGV[i] == 'I' then  -- HINCRBY past 2^63 would fail halfway: refuse before writing
    local old = redis.call('HGET', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]) or '0'
    if tonumber(ARGV[i + 3]) + tonumber(old) > LIMIT then return {3} end
  end
end
local digests = {}
for j = 1, #blob, size do digests[#digests + 1] = string.sub(blob, j, j + size - 1) end
local seen = {}
for _, d in ipairs(digests) do
  for k = 5, 4 + live do
    if redis.call('SISMEMBER', KEYS[k], d) == 1 then
      seen[#seen + 1] = d
      break
    end
  end
end
if #seen > 0 then return {2, seen} end
for _, d in ipairs(digests) do redis.call('SADD', KEYS[5], d) end
if #digests > 0 then redis.call('EXPIREAT', KEYS[5], ARGV[4]) end
if redis.call('HLEN', KEYS[2]) > 0 then  -- settle the reservations these events close
  for _, d in ipairs(digests) do release(KEYS[2], KEYS[3], KEYS[4], d) end
end
local expiries = 9
local i = first_op
while i <= #ARGV do
  local code, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  local field, value, extra = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if code == 'I' then
    redis.call('HINCRBY', key, field, value)
  elseif code == 'M' then
    local old = redis.call('HGET', key, field)
    if not old or gt(value, old) then redis.call('HSET', key, field, value) end
  elseif code == 'L' then
    local old = redis.call('HGET', key, field .. '@t')
    if not old or not gt(old, extra) then
      redis.call('HSET', key, field, value, field .. '@t', extra)
    end
  elseif code == 'U' then
    if redis.call('SADD', key, value) == 1 then
      redis.call('HINCRBY', KEYS[tonumber(extra)], field, SCALE)
    end
  end
  i = i + 5
end
for k = 5 + live, #KEYS do
  redis.call('EXPIREAT', KEYS[k], ARGV[expiries + k - 5 - live])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1}
""".replace("@SCALE@", str(VALUE_SCALE))
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


class RedisSink:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_APPLY)

    async def stored_offsets(self, wanted: list[tuple[str, str]]) -> list[int | None]:
        """The applied offset of each (customer, offset field)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for customer, field in wanted:
                pipe.hget(redis_keys.offsets(customer), field)
            raw = await pipe.execute()
        return [int(v) if v is not None else None for v in raw]

    async def apply(self, batch: list[Apply]) -> list[tuple[Outcome, set[bytes]]]:
        """Try each customer's share; for refused ones, say why (and which digests)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in batch:
                keys, args = _arguments(item)
                await self._script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [(Outcome(int(r[0])), set(r[1]) if len(r) > 1 else set()) for r in results]


def _arguments(item: Apply) -> tuple[list[str], list[bytes | str | int]]:
    ops = item.ops
    touched = list(ops.expiry)
    first = 5 + len(item.seen_keys)
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
        *(ops.expiry[key] for key in touched),
    ]
    for (key, field), value in ops.sums.items():
        args += ["I", index[key], field, value, ""]
    for (key, field), value in ops.maxima.items():
        args += ["M", index[key], field, value, ""]
    for (key, field), (at, value) in ops.latest.items():
        args += ["L", index[key], field, value, at]
    for (unique, counters, field), members in ops.members.items():
        for member in members:
            args += ["U", index[unique], field, member, index[counters]]
    customer = item.customer
    keys = [
        redis_keys.offsets(customer),
        redis_keys.reservations(customer),
        redis_keys.reservation_expiries(customer),
        redis_keys.held(customer),
        *item.seen_keys,
        *touched,
    ]
    return keys, args
