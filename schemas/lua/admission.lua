-- What every admission shares, enforce.lua and lease.lua alike: the clock, the answer's
-- encoding, the caller's checks (key and account status), the rate-limit algorithms and
-- a quota's report.  Prepended to each script, so that both decide with one definition.
local MICRO = 1000000

-- Times come from the Redis server's clock, so every API server agrees; a non-empty
-- override replaces it (tests only).
local now_us, now
local function set_clock(override)
  if override ~= '' then
    now_us = tonumber(override)
  else
    local t = redis.call('TIME')
    now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  now = math.floor(now_us / 1000)
end

local function answer(code, extra)
  extra = extra or {}
  extra.c = code
  return cjson.encode(extra)
end

-- amounts as strings: cjson would round numbers beyond 14 digits
local function int(n) return string.format('%d', n) end

local function ceil_div(a, b) return math.floor((a + b - 1) / b) end

-- The key (unless a service token asks: key_id ''): nil when it may act with `scope`,
-- else the refusal to return.
local function check_key(keys, key_id, scope)
  if key_id == '' then return nil end
  local key = redis.call('HGET', keys, key_id)
  if not key then return answer('key_unknown') end
  local k = cjson.decode(key)
  if k.r then return answer('key_revoked') end
  if k.x and k.x <= now then return answer('key_expired') end
  for _, s in ipairs(k.s) do if s == scope then return nil end end
  return answer('key_scope')
end

-- The account's status: nil when it may go on, else the refusal to return.  `account`
-- is the HMGET of the account_state.FIELDS; `grace` the past_due grace in ms ('' =
-- never refused).
local function check_account(account, grace)
  local plan, status = account[1], account[2]
  if status == 'cancelled' or status == 'suspended' then
    return answer('inactive', {p = plan, s = status})
  end
  if status == 'trial' and account[3] ~= '' and tonumber(account[3]) <= now then
    return answer('trial_expired', {p = plan, s = status})
  end
  -- An unpaid account keeps working for the grace period, then is refused until paid.
  if status == 'past_due' and grace and grace ~= '' and account[5] and account[5] ~= '' then
    local ends = tonumber(account[5]) + tonumber(grace)
    if ends <= now then return answer('past_due', {p = plan, s = status, g = ends}) end
  end
  return nil
end

-- Both, the key first.
local function check_caller(account, keys, key_id, scope, grace)
  return check_key(keys, key_id, scope) or check_account(account, grace)
end

-- Each algorithm: (limit, window ms, capacity, state or false, cost) ->
--   ok, remaining, reset ms, retry ms, new state.
-- Each room: (limit, window ms, capacity, state or false, cost) -> how many calls of
--   `cost` the policy admits now: n calls fit exactly when the algorithm admits n * cost.
local algorithms, rooms = {}, {}

-- Token bucket in integer token-milliseconds: `limit` tokens arrive per window.
local function bucket_tokens(l, w, cap, state)
  local capacity = cap * w
  local tokens = capacity
  if state then
    local a, b = string.match(state, '^(%d+):(%d+)$')
    local ts
    tokens, ts = tonumber(a), tonumber(b)
    local elapsed = math.min(math.max(now - ts, 0), ceil_div(capacity, l))
    tokens = math.min(capacity, tokens + elapsed * l)
  end
  return tokens, capacity
end

function algorithms.token_bucket(l, w, cap, state, cost)
  local tokens, capacity = bucket_tokens(l, w, cap, state)
  local need = cost * w
  if tokens >= need then
    local left = tokens - need
    return true, math.floor(left / w), ceil_div(capacity - left, l), 0,
      string.format('%d:%d', left, now)
  end
  local retry = cost > cap and w or ceil_div(need - tokens, l)
  return false, math.floor(tokens / w), ceil_div(capacity - tokens, l), retry, nil
end

function rooms.token_bucket(l, w, cap, state, cost)
  return math.floor(bucket_tokens(l, w, cap, state) / (cost * w))
end

-- GCRA in integer microseconds: a theoretical arrival time, `cap` emission intervals
-- of tolerance.
function algorithms.gcra(l, w, cap, state, cost)
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

function rooms.gcra(l, w, cap, state, cost)
  local interval = math.floor(w * 1000 / l)
  local tat = state and tonumber(state) or now_us
  if tat < now_us then tat = now_us end
  return math.max(math.floor((interval * cap - (tat - now_us)) / (cost * interval)), 0)
end

-- Fixed window: a count per window, reset at each boundary.
local function window_count(w, state)
  local index, count = math.floor(now / w), 0
  if state then
    local a, b = string.match(state, '^(%d+):(%d+)$')
    if tonumber(a) == index then count = tonumber(b) end
  end
  return index, count
end

function algorithms.fixed_window(l, w, _, state, cost)
  local index, count = window_count(w, state)
  local reset = (index + 1) * w - now
  if count + cost <= l then
    return true, l - count - cost, reset, 0, string.format('%d:%d', index, count + cost)
  end
  return false, l - count, reset, cost > l and w or reset, nil
end

function rooms.fixed_window(l, w, _, state, cost)
  local _, count = window_count(w, state)
  return math.max(math.floor((l - count) / cost), 0)
end

-- Sliding window counter: this window's count plus the previous one's, weighted by
-- how much of it the sliding window still covers.  Integer count-milliseconds.
local function sliding_counts(w, state)
  local index = math.floor(now / w)
  local current, previous = 0, 0
  if state then
    local a, b, c = string.match(state, '^(%d+):(%d+):(%d+)$')
    a, b, c = tonumber(a), tonumber(b), tonumber(c)
    if a == index then current, previous = b, c
    elseif a == index - 1 then previous = b end
  end
  local elapsed = now - index * w
  return index, current, previous, elapsed, previous * (w - elapsed) + current * w
end

function algorithms.sliding_window(l, w, _, state, cost)
  local index, current, previous, elapsed, estimate = sliding_counts(w, state)
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

function rooms.sliding_window(l, w, _, state, cost)
  local _, _, _, _, estimate = sliding_counts(w, state)
  return math.max(math.floor((l * w - estimate) / (cost * w)), 0)
end

-- Giving back what a lease took and did not spend (lease.lua), each algorithm:
--   below_full(limit, window ms, capacity, state or false): how far below full the
--     policy was when the lease was granted (token-ms, or µs of GCRA debt; 0 for windows)
--   refunds[a](limit, window ms, capacity, state or false, cost, granted at ms, below):
--     the state with `cost` given back, or nil when nothing may be.
-- A refund may never admit a call that the limit would have refused had the unspent
-- part never been taken.  A window's count is a plain sum: the part is taken off as long
-- as the window it was counted in still counts.  A bucket forgets: once it would have
-- refilled to capacity, what was taken from it no longer matters, so after `below`
-- worth of refill has passed since the grant each further unit of refill gives back
-- one unit less.
local below_full, refunds = {}, {}

function below_full.token_bucket(l, w, cap, state)
  local tokens, capacity = bucket_tokens(l, w, cap, state)
  return capacity - tokens
end

function below_full.gcra(_, _, _, state)
  return state and math.max(tonumber(state) - now_us, 0) or 0
end

function below_full.fixed_window() return 0 end
below_full.sliding_window = below_full.fixed_window

function refunds.token_bucket(l, w, cap, state, cost, at, below)
  local back = cost * w - math.max((now - at) * l - below, 0)
  if not state or back <= 0 then return nil end
  local tokens, capacity = bucket_tokens(l, w, cap, state)
  return string.format('%d:%d', math.min(capacity, tokens + back), now)
end

function refunds.gcra(l, w, _, state, cost, at, below)
  local interval = math.floor(w * 1000 / l)
  local back = cost * interval - math.max(now_us - at * 1000 - below, 0)
  if not state or back <= 0 then return nil end
  return string.format('%d', math.max(tonumber(state) - back, now_us))
end

function refunds.fixed_window(_, w, _, state, cost, at)
  if not state then return nil end
  local index, count = string.match(state, '^(%d+):(%d+)$')
  if tonumber(index) ~= math.floor(at / w) then return nil end
  return string.format('%s:%d', index, math.max(tonumber(count) - cost, 0))
end

function refunds.sliding_window(_, w, _, state, cost, at)
  if not state then return nil end
  local index, current, previous = string.match(state, '^(%d+):(%d+):(%d+)$')
  index, current, previous = tonumber(index), tonumber(current), tonumber(previous)
  local counted = math.floor(at / w)
  if index == counted then
    current = math.max(current - cost, 0)
  elseif index == counted + 1 then
    previous = math.max(previous - cost, 0)
  else
    return nil
  end
  return string.format('%d:%d:%d', index, current, previous)
end

-- The rate-limit cost of one call to `endpoint` (the plan's endpoint costs, else 1).
local function call_cost(policies, endpoint)
  if endpoint ~= '' and policies.costs[endpoint] then return policies.costs[endpoint] end
  return 1
end

-- Where a policy's state is filed for this call: under its name and algorithm (a policy
-- whose algorithm changed starts afresh instead of misreading another algorithm's
-- state), then the key and endpoint it is scoped to; a policy scoped per end user keeps
-- its state in the end user's own hash.  `facts` = {k = key id, e = endpoint, u = end
-- user}.  Returns the hash and the field, or nil when the call lacks the end user.
local function rate_slot(p, facts, states_key, user_key)
  local field = p.n .. '|' .. p.a
  if not p.s then return states_key, field end
  if string.find(p.s, 'k', 1, true) then field = field .. '|k=' .. facts.k end
  if string.find(p.s, 'e', 1, true) then field = field .. '|e=' .. facts.e end
  if string.find(p.s, 'u', 1, true) then
    if facts.u == '' then return nil end
    return user_key, field
  end
  return states_key, field
end

local function applies(p, endpoint) return not p.e or p.e == endpoint end

-- Every rate limit that applies to `endpoint`, asked for `cost` tokens: the limits'
-- reports, the index of the one refusing longest (0: none), the states to write if
-- everything is admitted (hash -> field, state, ...), and how long the states must
-- live: as long as the slowest policy of the plan needs, whichever policies this call
-- touched (an endpoint's daily limit must outlive calls to other endpoints).  The
-- fifth result names a policy scoped per end user when the call names none.
local function ask_rates(policies, endpoint, cost, states_key, facts, user_key)
  local limits, refused, states, keep = {}, 0, {}, 0
  for _, p in ipairs(policies.rates) do
    keep = math.max(keep, 2 * p.w, p.w * math.ceil(p.b / p.l) + p.w)
    if applies(p, endpoint) then
      local key, field = rate_slot(p, facts, states_key, user_key)
      if not key then return limits, 0, {}, keep, p.n end
      local ok, remaining, reset, retry, state =
        algorithms[p.a](p.l, p.w, p.b, redis.call('HGET', key, field) or false, cost)
      limits[#limits + 1] = {n = p.n, k = 'rate', a = p.a, lim = p.l, w = p.w,
                             rem = remaining, reset = reset, retry = retry}
      if ok then
        states[key] = states[key] or {}
        local pending = states[key]
        pending[#pending + 1] = field
        pending[#pending + 1] = state
      elseif refused == 0 or retry > limits[refused].retry then
        refused = #limits
      end
    end
  end
  return limits, refused, states, keep, nil
end

local function write_rates(states, keep)
  for key, pending in pairs(states) do
    redis.call('HSET', key, unpack(pending))
    redis.call('PEXPIRE', key, keep)
  end
end

-- Release what expired among reservations and leases (a bounded number per call).
local function release_expired(reservations, expiries, held)
  local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', now, 'LIMIT', 0, 100)
  for _, d in ipairs(expired) do release(reservations, expiries, held, d) end
end

-- The limits' reports of a refused call: what remains without it.  Each report says
-- what would remain after the call; a refusal takes nothing, so the policies that would
-- have admitted it (retry 0) get its `cost` back, and the quota what it held before.
local function as_refused(limits, cost)
  for _, item in ipairs(limits) do
    if item.k == 'quota' then
      item.rem = int(math.max(tonumber(item.lim) - tonumber(item.used), 0))
    elseif item.retry == 0 then
      item.rem = item.rem + cost
    end
  end
end

-- A quota's report after `wanted` more micro-units; over = it would be exceeded.
local function quota_limit(meter, quota, used, held, wanted, period_start, period_end)
  local window, reset = period_end - period_start, period_end - now
  local over = used + held + wanted > quota.l
  return {n = 'quota:' .. meter, k = 'quota', lim = int(quota.l), w = window,
          rem = int(math.max(quota.l - used - held - wanted, 0)),
          reset = reset, retry = (over and quota.h) and reset or 0,
          h = quota.h, used = int(used + held)}, over
end
