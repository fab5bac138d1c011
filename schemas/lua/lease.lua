-- A lease: units of a meter's quota and tokens of each rate limit, taken at once for a
-- process to spend locally (DESIGN.md decision 8).  The caller's checks, the algorithms
-- and the quota's report are enforce.lua's (admission.lua); only the amount differs:
--   granted = min(want, every rate limit's room, the hard quota's room,
--                 max(1, the tightest of those rooms / share))
-- so leases are large far from a limit and one unit near it, and concurrent holders
-- cannot starve each other.  Rate-limit tokens are consumed when granted.  The quota's
-- part is held like a reservation: `held[meter]` grows by the grant and the lease's
-- record in the reservations hash, `<meter>|<held>|<term grant>|<term end ms>|<term>`,
-- says how much of it is this lease's and which term it is in ('-' once returned); a
-- term's record goes on with what its rate limits gave, `|<calls>|<cost>|<granted at
-- ms>|<plan digest>|<each policy's below_full>|<key id>|<endpoint>`.  Events naming
-- the lease move their units from held to usage as the aggregator counts them
-- (apply_batch.lua); a return (or a renewal) frees the unspent part of the term at once,
-- its quota units and, as far as admission.lua's refunds allow, its rate-limit tokens
-- (unless the plan changed since); whatever is still held when the record's deadline
-- (term end, or return, + settle window) passes is released as reservations are.  A
-- plan limiting the endpoint per end user is not leased ('per_request'): the holder
-- decides those calls one by one with /v1/enforce, which names the end user.
--
-- A numbered request (its term: 1 takes the lease under the id the client chose, n
-- renews it into its nth term, a return names the term it returns) is idempotent: its
-- grant is kept with its number for a term and a settle window, and the same request
-- again — a client resending after the answer was lost on a dropped connection — gets
-- that answer back (with the time the term has left) and changes nothing.  Any other
-- number than the next term's (a late copy of an older request) is 'lease_stale' and
-- changes nothing either; any numbered request of a returned lease is 'lease_unknown',
-- its take too (the return may have removed the record: the kept answer says so).
-- Unnumbered, a resent take would hold a second grant nobody spends and a resent
-- renewal would free the new term as if it were the old one.
--
-- KEYS: 1 account  2 keys  3 rate states  4 reservations  5 reservation expiries
--       6 held totals  7 the meter's counters for the current period
--       8 the lease's last numbered answer
-- ARGV: 1 key id ('' = service token)  2 scope  3 now in µs ('' = Redis TIME)
--       4 endpoint  5 calls wanted  6 mode (take|renew|return)  7 lease id
--       8 micro-units spent of the current term (renew, return)  9 meter
--       10 period start (ms)  11 period end (ms)  12 lease ttl (ms)
--       13 settle window (ms)  14 share  15 past_due grace (ms; '' = never refused)
--       16 the term this request starts ('' = not numbered)
set_clock(ARGV[3])
local mode, id, meter = ARGV[6], ARGV[7], ARGV[9]
local ttl, settle = tonumber(ARGV[12]), tonumber(ARGV[13])
local number = ARGV[16]
local RETURNED = 'returned'  -- the last numbered answer of a lease returned
-- what a resend must repeat: mode, meter, endpoint, spent and key
local asked = redis.sha1hex(table.concat({mode, meter, ARGV[4], ARGV[8], ARGV[1]}, '\0'))

if number ~= '' and mode ~= 'return' then  -- a return names the term it ends
  local last = redis.call('GET', KEYS[8])
  if last == RETURNED then return answer('lease_unknown') end  -- a late copy: nothing more
  if last then
    local n, was, reply = string.match(last, '^(%d+)|(%x+)|(.*)$')
    if n == number then
      if was ~= asked then return answer('lease_reused') end
      local body = cjson.decode(reply)  -- a resend: the same answer, its term's time left
      body.i = math.max(body.e - now, 0)
      return cjson.encode(body)
    end
  end
end
if mode == 'take' and redis.call('HEXISTS', KEYS[4], id) == 1 then
  return answer('lease_taken')
end

local account = redis.call('HMGET', KEYS[1], @ACCOUNT_FIELDS@)
if not account[1] then return answer('no_account') end

-- `n`: the term number the record is in now ('-': returned); `rates`: what the term took
-- of the rate limits, to give back what it does not spend ('': nothing)
local function record(held, term, ends, n, rates)
  local value = string.format('%s|%d|%d|%d|%s', meter, held, term, ends, n)
  if rates and rates ~= '' then value = value .. '|' .. rates end
  redis.call('HSET', KEYS[4], id, value)
  redis.call('ZADD', KEYS[5], ends + settle, id)
  for k = 4, 6 do redis.call('PEXPIRE', KEYS[k], 2 * (ttl + settle)) end
end

-- A renewal or a return first gives back the term's unspent units: held no longer
-- covers what the holder can no longer spend.  What it spent stays held until its
-- events settle it or the settle window passes.
-- Only a key that may take a lease may renew or return one: a revoked key, or one
-- without the scope, is refused before the lease is touched (its unspent units stay
-- with the holder that can still spend them).
local key_refusal = check_key(KEYS[2], ARGV[1], ARGV[2])
if key_refusal then return key_refusal end

local policies = cjson.decode(account[4])
local digest = string.sub(redis.sha1hex(account[4]), 1, 8)

-- Tokens the term took and the holder did not spend go back to each rate limit that
-- took them (`rates`: the record's rate part), when the plan is the one that took them.
local function give_back_rates(rates, spent)
  local calls, cost, at, taken_under, belows, key_id, endpoint =
    string.match(rates, '^(%d+)|(%d+)|(%d+)|(%x*)|([%d,]*)|([^|]*)|(.*)$')
  if not calls or taken_under ~= digest then return end
  local unspent = tonumber(calls) - spent
  if unspent <= 0 then return end
  local facts, i = {k = key_id, e = endpoint, u = ''}, 0
  local below = {}
  for b in string.gmatch(belows, '%d+') do below[#below + 1] = tonumber(b) end
  for _, p in ipairs(policies.rates) do
    if applies(p, endpoint) then
      i = i + 1
      local key, field = rate_slot(p, facts, KEYS[3], KEYS[3])
      local state = key and redis.call('HGET', key, field) or false
      local given = key and below[i] and refunds[p.a](p.l, p.w, p.b, state,
        unspent * tonumber(cost), tonumber(at), below[i])
      if given then redis.call('HSET', key, field, given) end
    end
  end
end

local carried, freed = 0, 0
local current = 0  -- the lease's term number (a take: 0)
if mode ~= 'take' then
  local found = redis.call('HGET', KEYS[4], id)
  if not found then return answer('lease_unknown') end
  local m, held, term, n, rates =
    string.match(found, '^([^|]*)|(%d+)|(%d+)|%d+|?([^|]*)|?(.*)$')
  if not term then return answer('lease_unknown') end
  if n == '-' and mode == 'renew' and number ~= '' then  -- returned: numbered, closed
    return answer('lease_unknown')
  end
  current = tonumber(n) or 0
  if number ~= '' then
    local next_one = mode == 'renew' and current + 1 or current
    if tonumber(number) ~= next_one then return answer('lease_stale', {n = n}) end
  end
  if mode == 'return' then meter = m end
  if m ~= meter then return answer('lease_meter', {m = m}) end
  -- more spent than the term granted: the holder's count is wrong, so is what it would free
  local spent, calls = math.floor(tonumber(ARGV[8]) / MICRO), string.match(rates, '^(%d+)|')
  if calls and spent > tonumber(calls) then
    return answer('lease_overspent', {n = tonumber(calls)})
  end
  held, term = tonumber(held), tonumber(term)
  freed = math.min(math.max(term - tonumber(ARGV[8]), 0), held)
  if freed > 0 then redis.call('HINCRBY', KEYS[6], meter, int(-freed)) end
  carried = held - freed
  if rates ~= '' then give_back_rates(rates, spent) end
  if mode == 'return' then
    if carried == 0 then
      redis.call('HDEL', KEYS[4], id)
      redis.call('ZREM', KEYS[5], id)
    else
      record(carried, 0, now, '-')
    end
    -- a late copy of any numbered request of this lease, its take included, grants nothing
    redis.call('SET', KEYS[8], RETURNED, 'PX', ttl + settle)
    return answer('returned', {m = meter, h = int(carried), f = int(freed)})
  end
  -- its record is rewritten below; meanwhile no expiry sweep may release it (whose
  -- held it states no longer does)
  redis.call('ZADD', KEYS[5], now + settle, id)
end

-- A refused renewal keeps the lease, its grant returned: what it spent stays held.
local function refuse(refusal)
  if mode == 'renew' then record(carried, 0, now, current) end
  return refusal
end

local refusal = check_account(account, ARGV[15])  -- the key was checked above
if refusal then return refuse(refusal) end
local plan, status = account[1], account[2]

local endpoint = ARGV[4]
local cost = call_cost(policies, endpoint)
-- No end user here: a limit per end user is decided call by call (/v1/enforce).
local facts = {k = ARGV[1] ~= '' and ARGV[1] or '-', e = endpoint, u = ''}
local tightest, belows = math.huge, {}
for _, p in ipairs(policies.rates) do
  if applies(p, endpoint) then
    local key, field = rate_slot(p, facts, KEYS[3], KEYS[3])
    if not key then return refuse(answer('per_request', {p = plan, s = status, sp = p.n})) end
    local state = redis.call('HGET', key, field) or false
    tightest = math.min(tightest, rooms[p.a](p.l, p.w, p.b, state, cost))
    belows[#belows + 1] = int(below_full[p.a](p.l, p.w, p.b, state))
  end
end
local quota = policies.quotas[meter]
local used, held = 0, 0
if quota then
  release_expired(KEYS[4], KEYS[5], KEYS[6])
  used = tonumber(redis.call('HGET', KEYS[7], '*') or '0')
  held = tonumber(redis.call('HGET', KEYS[6], meter) or '0')
  if quota.h then
    tightest = math.min(tightest, math.max(math.floor((quota.l - used - held) / MICRO), 0))
  end
end
local granted = math.min(tonumber(ARGV[5]), tightest)
if tightest < math.huge then
  granted = math.min(granted, math.max(math.floor(tightest / tonumber(ARGV[14])), 1))
end

-- Nothing to grant: the refusal /v1/enforce would give one call now.
local wanted = granted > 0 and granted or 1
local limits, refused, states, keep =
  ask_rates(policies, endpoint, wanted * cost, KEYS[3], facts, KEYS[3])
if quota then
  local item, over = quota_limit(meter, quota, used, held, wanted * MICRO,
                                 tonumber(ARGV[10]), tonumber(ARGV[11]))
  limits[#limits + 1] = item
  if over and quota.h then refused = #limits end
end
local result = {p = plan, s = status, u = policies.up, x = policies.x, l = limits, v = refused}
if refused > 0 then
  as_refused(limits, wanted * cost)
  return refuse(answer('refused', result))
end
if granted == 0 then return redis.error_reply('lease: a room of 0 refused nothing') end

write_rates(states, keep)
local hold = quota and granted * MICRO or 0
if hold > 0 then redis.call('HINCRBY', KEYS[6], meter, int(hold)) end
local rates = table.concat(
  {int(granted), int(cost), int(now), digest, table.concat(belows, ','), facts.k, endpoint}, '|')
record(carried + hold, hold, now + ttl, current + 1, rates)
result.n, result.t, result.e, result.f = granted, granted * cost, now + ttl, int(freed)
result.i = ttl
local reply = answer('ok', result)
if number ~= '' then
  redis.call('SET', KEYS[8], number .. '|' .. asked .. '|' .. reply, 'PX', ttl + settle)
end
return reply
