-- The aggregator's Redis sink: one customer's share of a batch, applied atomically and
-- guarded by the Kafka offset it reaches (services/aggregator/redis_sink.py).
-- KEYS: offsets hash, the reservations hash, their expiries, the held totals, the
--       compiled alert thresholds, the fired markers, the crossings out list, the
--       whole-invoice spend mark, the live
--       de-duplication sets (the current bucket first), then every counter/unique key
--       the ops touch.
-- ARGV: offset field, expected offset ('' = none yet), new offset, seen-set expire-at,
--       offsets ttl, digest size, n live sets, the digests concatenated (one argument:
--       cheap to send), the month totals to check against alert thresholds
--       ('<key index> <meter> <month bucket>' lines: yyyymm, or yyyymm@Zone/Name), expire-at per touched key,
--       then ops as (code, key index, field, value, extra) quintuples.
-- Op S settles a lease (lease.lua): `value` micro-units of meter `extra` counted from
-- events naming lease `field` move from what it holds to usage, in this same call.
-- Replies {1, {}, waiting}, {0, {}, waiting} (offset moved), where `waiting` counts the
-- crossings queued plus 1 while a spend mark waits for the aggregator to hand it over,
-- {2, digests already seen} or {3} (a counter would overflow).
local SCALE = @SCALE@
local LIMIT = 9.0e18  -- below 2^63 by more than a double's rounding error there
local function gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local FIXED_KEYS, FIXED_ARGS = 8, 9
local FIRED_TTL = @FIRED_TTL@
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local function waiting()
  return redis.call('LLEN', KEYS[7]) + redis.call('EXISTS', KEYS[8])
end
if current ~= ARGV[2] then return {0, {}, waiting()} end
local size, live, blob = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local first_key = FIXED_KEYS + 1 + live  -- the first counter/unique key
local first_op = FIXED_ARGS + 1 + #KEYS - first_key + 1
for i = first_op, #ARGV, 5 do
  if ARGV[i] == 'I' then  -- HINCRBY past 2^63 would fail halfway: refuse before writing
    local old = redis.call('HGET', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]) or '0'
    if tonumber(ARGV[i + 3]) + tonumber(old) > LIMIT then return {3} end
  end
end
local digests = {}
for j = 1, #blob, size do digests[#digests + 1] = string.sub(blob, j, j + size - 1) end
-- Set commands take the digests CHUNK at a time (unpack's limit is 8,000 values): a
-- call per live set and chunk, not one per digest and set; this runs for every event.
local CHUNK = 1000
local function chunks(command, key)
  local replies = {}
  for first = 1, #digests, CHUNK do
    replies[#replies + 1] =
      redis.call(command, key, unpack(digests, first, math.min(first + CHUNK - 1, #digests)))
  end
  return replies
end
local found = {}
for k = FIXED_KEYS + 1, FIXED_KEYS + live do
  for c, flags in ipairs(chunks('SMISMEMBER', KEYS[k])) do
    for j = 1, #flags do
      if flags[j] == 1 then found[(c - 1) * CHUNK + j] = true end
    end
  end
end
local seen = {}
for j = 1, #digests do
  if found[j] then seen[#seen + 1] = digests[j] end
end
if #seen > 0 then return {2, seen} end
local current_seen = KEYS[FIXED_KEYS + 1]
if #digests > 0 then
  chunks('SADD', current_seen)
  redis.call('EXPIREAT', current_seen, ARGV[4])
end
-- Settle the reservations these events close.  Most events close none (a lease's events
-- settle the lease, by its id, below), so each chunk of digests is looked up in one
-- call, not one per digest; the few found are released as release.lua does one.
if redis.call('HLEN', KEYS[2]) > 0 then
  for first = 1, #digests, CHUNK do
    local last = math.min(first + CHUNK - 1, #digests)
    local closed = {}
    for j, r in ipairs(redis.call('HMGET', KEYS[2], unpack(digests, first, last))) do
      if r then
        local meter, amount = holding(r)
        if amount ~= '0' then redis.call('HINCRBY', KEYS[4], meter, '-' .. amount) end
        closed[#closed + 1] = digests[first + j - 1]
      end
    end
    if #closed > 0 then redis.call('HDEL', KEYS[2], unpack(closed)) end
    redis.call('ZREM', KEYS[3], unpack(digests, first, last))
  end
end
local i = first_op
while i <= #ARGV do
  local code, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  local field, value, extra = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if code == 'I' then
    redis.call('HINCRBY', key, field, value)
  elseif code == 'M' then
    local old = redis.call('HGET', key, field)
    if not old or gt(value, old) then redis.call('HSET', key, field, value) end
  elseif code == 'N' then  -- a minimum
    local old = redis.call('HGET', key, field)
    if not old or gt(old, value) then redis.call('HSET', key, field, value) end
  elseif code == 'L' then
    local old = redis.call('HGET', key, field .. '@TIME_SUFFIX@')
    if not old or not gt(old, extra) then
      redis.call('HSET', key, field, value, field .. '@TIME_SUFFIX@', extra)
    end
  elseif code == 'S' then
    local found = redis.call('HGET', KEYS[2], field)
    local m, held, rest
    if found then m, held, rest = string.match(found, '^([^|]*)|(%d+)(|%d+|%d+.*)$') end
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
for k = first_key, #KEYS do
  redis.call('EXPIREAT', KEYS[k], ARGV[FIXED_ARGS + 1 + k - first_key])
end
-- Alert thresholds: for each month total this call changed, the highest compiled
-- threshold at or below it fires when it is above the highest one already fired this
-- month (so several crossed at once fire once, and none ever fires twice).
for index, meter, month in string.gmatch(ARGV[9], '(%d+) (%S+) (%S+)') do
  local compiled = redis.call('HGET', KEYS[5], meter)
  local total = compiled and redis.call('HGET', KEYS[tonumber(index)], '*')
  if total and string.sub(total, 1, 1) ~= '-' then
    local best, label
    for quantity, name in string.gmatch(compiled, '(%d+) (%S+)') do
      if gt(quantity, total) then break end
      best, label = quantity, name
    end
    if best then
      local marker = meter .. '|' .. month
      local fired = redis.call('HGET', KEYS[6], marker)
      if not fired or gt(best, fired) then
        redis.call('HSET', KEYS[6], marker, best)
        redis.call('EXPIRE', KEYS[6], FIRED_TTL)
        redis.call('RPUSH', KEYS[7], table.concat({meter, month, best, total, label}, ' '))
      end
    end
  end
end
-- Whole-invoice spend rules are rated by billing, not here (money over several meters'
-- tiers is no usage level of one meter): mark the customer for billing to evaluate.
if ARGV[9] ~= '' and redis.call('HEXISTS', KEYS[5], '@SPEND_FIELD@') == 1 then
  redis.call('INCR', KEYS[8])
  redis.call('EXPIRE', KEYS[8], ARGV[5])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, {}, waiting()}
