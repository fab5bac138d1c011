"""The Redis sink: one atomic Lua call per customer and batch, guarded by Kafka offsets.

The call applies the batch's counter operations, marks its event digests as seen and
records the partition offset it reached — all or nothing.  It refuses to run unless the
stored offset is still the one the batch was computed against (compare-and-set), so a
replay after a crash, or a stale worker after a rebalance, can never count twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from schemas import redis_keys
from schemas.events import VALUE_SCALE
from services.aggregator.increments import CounterOps

OFFSETS_TTL_SECONDS = 45 * 24 * 3600

# KEYS: offsets hash, seen set, then every counter/unique key the ops touch.
# ARGV: offset field, expected offset ('' = none yet), new offset, seen expire-at,
#       offsets ttl, n digests, digests…, expire-at per touched key (KEYS[3..]),
#       then ops as (code, key index, field, value, time) quintuples.
_APPLY = """
local SCALE = @SCALE@
local function gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return {0, current} end
local n = tonumber(ARGV[6])
local i = 7
for _ = 1, n do
  redis.call('SADD', KEYS[2], ARGV[i])
  i = i + 1
end
if n > 0 then redis.call('EXPIREAT', KEYS[2], ARGV[4]) end
local expiries = i
i = i + #KEYS - 2
while i <= #ARGV do
  local code, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  local field, value, at = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if code == 'I' then
    redis.call('HINCRBY', key, field, value)
  elseif code == 'M' then
    local old = redis.call('HGET', key, field)
    if not old or gt(value, old) then redis.call('HSET', key, field, value) end
  elseif code == 'L' then
    local old = redis.call('HGET', key, field .. '@t')
    if not old or not gt(old, at) then redis.call('HSET', key, field, value, field .. '@t', at) end
  elseif code == 'U' then
    if redis.call('SADD', key, value) == 1 then
      redis.call('HINCRBY', KEYS[tonumber(at)], field, SCALE)
    end
  end
  i = i + 5
end
for k = 3, #KEYS do
  redis.call('EXPIREAT', KEYS[k], ARGV[expiries + k - 3])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, ARGV[3]}
""".replace("@SCALE@", str(VALUE_SCALE))


@dataclass(frozen=True, slots=True)
class Apply:
    """One customer's share of a batch, ready to send."""

    customer: str
    offset_field: str
    expected: int | None
    new_offset: int
    seen_key: str
    seen_expires_at: int
    digests: list[bytes]
    ops: CounterOps


class RedisSink:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_APPLY)

    async def stored_offsets(self, customers: list[str], field: str) -> dict[str, int | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for customer in customers:
                pipe.hget(redis_keys.offsets(customer), field)
            raw = await pipe.execute()
        return {c: int(v) if v is not None else None for c, v in zip(customers, raw, strict=True)}

    async def seen(self, keys: list[str], digests: list[bytes]) -> set[bytes]:
        """Which of ``digests`` are already in any of the ``keys`` sets."""
        if not digests:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.smismember(key, digests)
            answers = await pipe.execute()
        return {d for flags in answers for d, hit in zip(digests, flags, strict=True) if hit}

    async def apply(self, batch: list[Apply]) -> list[Apply]:
        """Apply each customer's share; return the ones whose offset moved under us."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in batch:
                keys, args = _arguments(item)
                await self._script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [item for item, result in zip(batch, results, strict=True) if int(result[0]) != 1]


def _arguments(item: Apply) -> tuple[list[str], list[bytes | str | int]]:
    ops = item.ops
    touched = list(ops.expiry)
    index = {key: position + 3 for position, key in enumerate(touched)}
    args: list[bytes | str | int] = [
        item.offset_field,
        "" if item.expected is None else str(item.expected),
        str(item.new_offset),
        item.seen_expires_at,
        OFFSETS_TTL_SECONDS,
        len(item.digests),
        *item.digests,
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
    keys = [redis_keys.offsets(item.customer), item.seen_key, *touched]
    return keys, args
