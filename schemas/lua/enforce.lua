-- One enforcement decision for one customer, atomically: key and account status, every
-- rate limit that applies, and the quota of the meter (aggregated usage + outstanding
-- reservations + quantity <= limit).  Either everything is admitted and recorded, or
-- nothing is written.  Times come from the Redis server's clock, so every API server
-- agrees; ARGV[3] overrides it (tests only).
--
-- KEYS: 1 account  2 keys  3 rate states  4 reservations  5 reservation expiries
--       6 held totals  7 the meter's counters for the current period
-- ARGV: 1 key id ('' = service token)  2 scope  3 now in µs ('' = Redis TIME)
--       4 endpoint  5 quantity (micro-units)  6 mode (check|reserve)  7 event digest
--       8 reservation ttl (ms)  9 meter  10 period start (ms)  11 period end (ms)
--       12 inline policies (optional)  13 past_due grace (ms; '' = never refused)
-- mode peek decides without recording anything.
local MICRO = 1000000

local now_us
if ARGV[3] ~= '' then
  now_us = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now = math.floor(now_us / 1000)

local function answer(code, extra)
  extra = extra or {}
  extra.c = code
  return cjson.encode(extra)
end

-- ARGV[12], when given, holds the policies inline: limits on something that is not a
-- customer (a client address before authentication); no account, key or quota then.
local inline = ARGV[12] ~= nil and ARGV[12] ~= ''
local account = {'', '', '', ARGV[12], ''}
if not inline then
  account = redis.call('HMGET', KEYS[1], @ACCOUNT_FIELDS@)
  if not account[1] then return answer('no_account') end
end
local plan, status = account[1], account[2]

if not inline and ARGV[1] ~= '' then
  local key = redis.call('HGET', KEYS[2], ARGV[1])
  if not key then return answer('key_unknown') end
  local k = cjson.decode(key)
  if k.r then return answer('key_revoked') end
  if k.x and k.x <= now then return answer('key_expired') end
  local scoped = false
  for _, s in ipairs(k.s) do if s == ARGV[2] then scoped = true end end
  if not scoped then return answer('key_scope') end
end

if status == 'cancelled' or status == 'suspended' then
  return answer('inactive', {p = plan, s = status})
end
if status == 'trial' and account[3] ~= '' and tonumber(account[3]) <= now then
  return answer('trial_expired', {p = plan, s = status})
end
-- An unpaid account keeps working for the grace period, then is refused until paid.
if status == 'past_due' and ARGV[13] and ARGV[13] ~= ''
   and account[5] and account[5] ~= '' then
  local ends = tonumber(account[5]) + tonumber(ARGV[13])
  if ends <= now then return answer('past_due', {p = plan, s = status, g = ends}) end
end

local policies = cjson.decode(account[4])
local endpoint, qty, mode, digest = ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
local cost = 1
if endpoint ~= '' and policies.costs[endpoint] then cost = policies.costs[endpoint] end

local function ceil_div(a, b) return math.floor((a + b - 1) / b) end

-- Each algorithm: (limit, window ms, capacity, state or false) ->
--   ok, remaining, reset ms, retry ms, new state.
local algorithms = {}

-- Token bucket in integer token-milliseconds: `limit` tokens arrive per window.
function algorithms.token_bucket(l, w, cap, state)
  local capacity = cap * w
  local tokens, ts = capacity, now
  if state then
    local a, b = string.match(state, '^(%d+):(%d+)$')
    tokens, ts = tonumber(a), tonumber(b)
    local elapsed = math.min(math.max(now - ts, 0), ceil_div(capacity, l))
    tokens = math.min(capacity, tokens + elapsed * l)
  end
  local need = cost * w
  if tokens >= need then
    local left = tokens - need
    return true, math.floor(left / w), ceil_div(capacity - left, l), 0,
      string.format('%d:%d', left, now)
  end
  local retry = cost > cap and w or ceil_div(need - tokens, l)
  return false, math.floor(tokens / w), ceil_div(capacity - tokens, l), retry, nil
end

-- GCRA in integer microseconds: a theoretical arrival time, `cap` emission intervals
-- of tolerance.
function algorithms.gcra(l, w, cap, state)
  local interval = math.floor(w * 1000 / l)
  local tolerance = interval * cap
  local tat = state and tonumber(state) or now_us
  if tat < now_us then tat = now_us end
  local new_tat = tat + cost * interval
  local debt = new_tat - now_us
  if debt <= tolerance then
    return true, math.floor((tolerance - debt) / interval), ceil_div(debt, 1000), 0,
      string.format('%d', new_tat)
  end
  local retry = cost > cap and w or ceil_div(debt - tolerance, 1000)
  return false, math.floor(math.max(tolerance - (tat - now_us), 0) / interval),
    ceil_div(tat - now_us, 1000), retry, nil
end

-- Fixed window: a count per window, reset at each boundary.
function algorithms.fixed_window(l, w, _, state)
  local index, count = math.floor(now / w), 0
  if state then
    local a, b = string.match(state, '^(%d+):(%d+)$')
    if tonumber(a) == index then count = tonumber(b) end
  end
  local reset = (index + 1) * w - now
  if count + cost <= l then
    return true, l - count - cost, reset, 0, string.format('%d:%d', index, count + cost)
  end
  return false, l - count, reset, cost > l and w or reset, nil
end

-- Sliding window counter: this window's count plus the previous one's, weighted by
-- how much of it the sliding window still covers.  Integer count-milliseconds.
function algorithms.sliding_window(l, w, _, state)
  local index = math.floor(now / w)
  local current, previous = 0, 0
  if state then
    local a, b, c = string.match(state, '^(%d+):(%d+):(%d+)$')
    a, b, c = tonumber(a), tonumber(b), tonumber(c)
    if a == index then current, previous = b, c
    elseif a == index - 1 then previous = b end
  end
  local elapsed = now - index * w
  local estimate = previous * (w - elapsed) + current * w
  local reset = w - elapsed
  if estimate + cost * w <= l * w then
    local left = math.floor((l * w - estimate) / w) - cost
    return true, left, reset, 0,
      string.format('%d:%d:%d', index, current + cost, previous)
  end
  local remaining = math.max(math.floor((l * w - estimate) / w), 0)
  if cost > l then return false, remaining, reset, w, nil end
  local retry
  if current + cost <= l then
    retry = ceil_div(w * previous - (l - current - cost) * w, previous) - elapsed
  else
    retry = reset
    if current > 0 then
      retry = retry + math.max(ceil_div(w * current - (l - cost) * w, current), 0)
    end
  end
  return false, remaining, reset, math.max(retry, 1), nil
end

-- A state is filed under its policy's name and algorithm: a policy whose algorithm
-- changed starts afresh instead of misreading another algorithm's state.  The states
-- live as long as the slowest policy of the plan needs, whichever policies this call
-- touched (an endpoint's daily limit must outlive calls to other endpoints).
local limits, refused, states, keep = {}, 0, {}, 0
for _, p in ipairs(policies.rates) do
  keep = math.max(keep, 2 * p.w, p.w * math.ceil(p.b / p.l) + p.w)
  if not p.e or p.e == endpoint then
    local field = p.n .. '|' .. p.a
    local ok, remaining, reset, retry, state =
      algorithms[p.a](p.l, p.w, p.b, redis.call('HGET', KEYS[3], field) or false)
    limits[#limits + 1] = {n = p.n, k = 'rate', a = p.a, lim = p.l, w = p.w,
                           rem = remaining, reset = reset, retry = retry}
    if ok then
      states[#states + 1] = field
      states[#states + 1] = state
    elseif refused == 0 or retry > limits[refused].retry then
      refused = #limits
    end
  end
end

local quota = policies.quotas[ARGV[9]]
local held_already = false
if quota then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 100)
  for _, d in ipairs(expired) do release(KEYS[4], KEYS[5], KEYS[6], d) end
  local used = tonumber(redis.call('HGET', KEYS[7], '*') or '0')
  local held = tonumber(redis.call('HGET', KEYS[6], ARGV[9]) or '0')
  if mode == 'reserve' then
    local earlier = redis.call('HGET', KEYS[4], digest)
    if earlier and earlier ~= ARGV[9] .. '|' .. ARGV[5] then
      return answer('reservation_conflict', {p = plan, s = status})
    end
    held_already = earlier ~= false and earlier ~= nil
  end
  local wanted = held_already and 0 or qty
  local window, reset = tonumber(ARGV[11]) - tonumber(ARGV[10]), tonumber(ARGV[11]) - now
  local over = used + held + wanted > quota.l
  -- amounts as strings: cjson would round numbers beyond 14 digits
  local function int(n) return string.format('%d', n) end
  limits[#limits + 1] = {n = 'quota:' .. ARGV[9], k = 'quota', lim = int(quota.l), w = window,
                         rem = int(math.max(quota.l - used - held - wanted, 0)),
                         reset = reset, retry = (over and quota.h) and reset or 0,
                         h = quota.h, used = int(used + held)}
  if over and quota.h then refused = #limits end
end

local result = {p = plan, s = status, u = policies.up, l = limits, v = refused}
if refused > 0 then return answer('refused', result) end
if mode == 'peek' then return answer('ok', result) end

if #states > 0 then
  redis.call('HSET', KEYS[3], unpack(states))
  redis.call('PEXPIRE', KEYS[3], keep)
end
if quota and mode == 'reserve' and not held_already then
  local ttl = tonumber(ARGV[8])
  redis.call('HSET', KEYS[4], digest, ARGV[9] .. '|' .. ARGV[5])
  redis.call('ZADD', KEYS[5], now + ttl, digest)
  redis.call('HINCRBY', KEYS[6], ARGV[9], ARGV[5])  -- as sent: a string, never '1e+17' 
  for k = 4, 6 do redis.call('PEXPIRE', KEYS[k], ttl * 2) end
  result.r = true
end
return answer('ok', result)
