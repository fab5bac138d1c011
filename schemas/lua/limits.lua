#!lua flags=no-writes
-- Every limit of one customer's plan, as the enforcement script (enforce.lua) would
-- count it now, without spending or recording anything: the no-writes flag makes Redis
-- refuse any write this script might attempt.  Same keys, same state, same arithmetic
-- as enforce.lua; `remaining` is what calls of cost 1 would find now (rate-limit tokens;
-- quota units), `reset` what enforce.lua reports as the reset.  Times come from the
-- Redis server's clock; ARGV[1] overrides it (tests only).
--
-- KEYS: 1 account  2 rate states  3 reservations  4 reservation expiries  5 held totals
--       6 the end user's rate states
--       7.. each meter's counters for the current period, in the order of ARGV[7..]
-- ARGV: 1 now in µs ('' = Redis TIME)  2 period start (ms)  3 period end (ms)
--       4 key id ('-' = service tokens)  5 endpoint  6 end user ('' = none named)
--       7.. the catalog's meter names
-- A limit scoped per key, endpoint or end user is read for the ones named (one not
-- named reads as one not seen yet: its whole limit left).
-- The answer carries the trial's end (`e`): a trial that ran out is ended by the caller
-- (as enforcement does) before its limits are told.
@RELEASE@
local now_us
if ARGV[1] ~= '' then
  now_us = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now = math.floor(now_us / 1000)

local account = redis.call('HMGET', KEYS[1], @ACCOUNT_FIELDS@)
if not account[1] then return cjson.encode({c = 'no_account'}) end
local policies = cjson.decode(account[3])

local function ceil_div(a, b) return math.floor((a + b - 1) / b) end

-- Each algorithm: (limit, window ms, capacity, state or false) -> remaining, reset ms.
-- The state formats and the refill arithmetic are enforce.lua's.
local algorithms = {}

function algorithms.token_bucket(l, w, cap, state)
  local capacity = cap * w
  local tokens = capacity
  if state then
    local a, b = string.match(state, '^(%d+):(%d+)$')
    local ts = tonumber(b)
    tokens = tonumber(a)
    local elapsed = math.min(math.max(now - ts, 0), ceil_div(capacity, l))
    tokens = math.min(capacity, tokens + elapsed * l)
  end
  return math.floor(tokens / w), ceil_div(capacity - tokens, l)
end

function algorithms.gcra(l, w, cap, state)
  local interval = math.floor(w * 1000 / l)
  local tolerance = interval * cap
  local tat = state and tonumber(state) or now_us
  if tat < now_us then tat = now_us end
  return math.floor(math.max(tolerance - (tat - now_us), 0) / interval),
    ceil_div(tat - now_us, 1000)
end

function algorithms.fixed_window(l, w, _, state)
  local index, count = math.floor(now / w), 0
  if state then
    local a, b = string.match(state, '^(%d+):(%d+)$')
    if tonumber(a) == index then count = tonumber(b) end
  end
  return math.max(l - count, 0), (index + 1) * w - now
end

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
  return math.max(math.floor((l * w - estimate) / w), 0), w - elapsed
end

-- enforce.lua's rate_slot (admission.lua): where a policy's state is for these facts
local function state_of(p)
  local field = p.n .. '|' .. p.a
  if not p.s then return redis.call('HGET', KEYS[2], field) or false end
  if string.find(p.s, 'k', 1, true) then field = field .. '|k=' .. ARGV[4] end
  if string.find(p.s, 'e', 1, true) then field = field .. '|e=' .. ARGV[5] end
  if not string.find(p.s, 'u', 1, true) then return redis.call('HGET', KEYS[2], field) or false end
  if ARGV[6] == '' then return false end
  return redis.call('HGET', KEYS[6], field) or false
end

local limits = {}
for _, p in ipairs(policies.rates) do
  local state = state_of(p)
  local remaining, reset = algorithms[p.a](p.l, p.w, p.b, state)
  -- token_bucket and gcra hold `burst` tokens, the windows `limit` calls
  local capacity = (p.a == 'token_bucket' or p.a == 'gcra') and p.b or p.l
  limits[#limits + 1] = {k = 'rate', n = p.n, a = p.a, lim = p.l, b = p.b, e = p.e,
                         s = p.s or '', used = math.max(capacity - remaining, 0),
                         rem = remaining, reset = reset, w = p.w}
end

-- enforce.lua releases at most 100 expired reservations before it counts what is held:
-- this counts them out the same way, without releasing them.
local released = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)
for _, d in ipairs(expired) do
  local r = redis.call('HGET', KEYS[3], d)
  if r then
    local meter, amount = holding(r)
    released[meter] = (released[meter] or 0) + tonumber(amount)
  end
end

-- amounts as strings: cjson would round numbers beyond 14 digits
local function int(n) return string.format('%d', n) end
local window, reset = tonumber(ARGV[3]) - tonumber(ARGV[2]), tonumber(ARGV[3]) - now
local counted = {}
for i = 7, #ARGV do
  local meter = ARGV[i]
  local quota = policies.quotas[meter]
  if quota then
    counted[meter] = true
    local used = tonumber(redis.call('HGET', KEYS[i], '*') or '0')
    local held = tonumber(redis.call('HGET', KEYS[5], meter) or '0') - (released[meter] or 0)
    limits[#limits + 1] = {k = 'quota', n = 'quota:' .. meter, m = meter, lim = int(quota.l),
                           h = quota.h, used = int(used), held = int(held),
                           rem = int(math.max(quota.l - used - held, 0)),
                           reset = reset, w = window}
  end
end
local missing = {}
for meter, _ in pairs(policies.quotas) do
  if not counted[meter] then missing[#missing + 1] = meter end
end

return cjson.encode({c = 'ok', p = account[1], s = account[2], e = account[4], t = now,
                     l = limits, k = policies.costs, x = missing})
