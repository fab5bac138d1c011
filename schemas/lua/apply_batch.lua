-- The aggregator's Redis sink: one customer's share of a batch, applied atomically and
-- guarded by the Kafka offset it reaches (services/aggregator/redis_sink.py).
-- KEYS: offsets hash, the reservations hash, their expiries, the held totals, the live
--       de-duplication sets (the current bucket first), then every counter/unique key
--       the ops touch.
-- ARGV: offset field, expected offset ('' = none yet), new offset, seen-set expire-at,
--       offsets ttl, digest size, n live sets, the digests concatenated (one argument:
--       cheap to send), expire-at per touched key,
--       then ops as (code, key index, field, value, extra) quintuples.
-- Op S settles a lease (lease.lua): `value` micro-units of meter `extra` counted from
-- events naming lease `field` move from what it holds to usage, in this same call.
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
    local old = redis.call('HGET', key, field .. '@TIME_SUFFIX@')
    if not old or not gt(old, extra) then
      redis.call('HSET', key, field, value, field .. '@TIME_SUFFIX@', extra)
    end
  elseif code == 'S' then
    local found = redis.call('HGET', KEYS[2], field)
    local m, held, rest
    if found then m, held, rest = string.match(found, '^([^|]*)|(%d+)(|%d+|%d+)$') end
    if rest and m == extra then
      local settled = math.min(tonumber(value), tonumber(held))
      if settled > 0 then
        redis.call('HINCRBY', KEYS[4], m, string.format('-%d', settled))
        redis.call('HSET', KEYS[2], field, string.format('%s|%d%s', m, held - settled, rest))
      end
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
