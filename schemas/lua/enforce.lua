-- One enforcement decision for one customer, atomically: key and account status, every
-- rate limit that applies, and the quota of the meter (aggregated usage + outstanding
-- reservations and leases + quantity <= limit).  Either everything is admitted and
-- recorded, or nothing is written.  The shared parts are in admission.lua.
--
-- KEYS: 1 account  2 keys  3 rate states  4 reservations  5 reservation expiries
--       6 held totals  7 the meter's counters for the current period
--       8 the end user's rate states
-- ARGV: 1 key id ('' = service token)  2 scope  3 now in µs ('' = Redis TIME)
--       4 endpoint  5 quantity (micro-units)  6 mode (check|reserve)  7 event digest
--       8 reservation ttl (ms)  9 meter  10 period start (ms)  11 period end (ms)
--       12 inline policies (optional)  13 past_due grace (ms; '' = never refused)
--       14 end user ('' = none named)
-- mode peek decides without recording anything.
set_clock(ARGV[3])

-- ARGV[12], when given, holds the policies inline: limits on something that is not a
-- customer (a client address before authentication); no account, key or quota then.
local inline = ARGV[12] ~= nil and ARGV[12] ~= ''
local account = {'', '', '', ARGV[12], ''}
if not inline then
  account = redis.call('HMGET', KEYS[1], @ACCOUNT_FIELDS@)
  if not account[1] then return answer('no_account') end
  local refusal = check_caller(account, KEYS[2], ARGV[1], ARGV[2], ARGV[13])
  if refusal then return refusal end
end
local plan, status = account[1], account[2]

local policies = cjson.decode(account[4])
local endpoint, qty, mode, digest = ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
local facts = {k = ARGV[1] ~= '' and ARGV[1] or '-', e = endpoint, u = ARGV[14] or ''}
local limits, refused, states, keep, unnamed =
  ask_rates(policies, endpoint, call_cost(policies, endpoint), KEYS[3], facts, KEYS[8])
if unnamed then return answer('end_user_required', {p = plan, s = status, sp = unnamed}) end

local quota = policies.quotas[ARGV[9]]
local held_already = false
if quota then
  release_expired(KEYS[4], KEYS[5], KEYS[6])
  local used = tonumber(redis.call('HGET', KEYS[7], '*') or '0')
  local held = tonumber(redis.call('HGET', KEYS[6], ARGV[9]) or '0')
  if mode == 'reserve' then
    local earlier = redis.call('HGET', KEYS[4], digest)
    if earlier and earlier ~= ARGV[9] .. '|' .. ARGV[5] then
      return answer('reservation_conflict', {p = plan, s = status})
    end
    held_already = earlier ~= false and earlier ~= nil
  end
  local item, over = quota_limit(ARGV[9], quota, used, held, held_already and 0 or qty,
                                 tonumber(ARGV[10]), tonumber(ARGV[11]))
  limits[#limits + 1] = item
  if over and quota.h then refused = #limits end
end

local result = {p = plan, s = status, u = policies.up, x = policies.x, l = limits, v = refused}
if refused > 0 then
  as_refused(limits, call_cost(policies, endpoint))
  return answer('refused', result)
end
if mode == 'peek' then return answer('ok', result) end

write_rates(states, keep)
if quota and mode == 'reserve' and not held_already then
  local ttl = tonumber(ARGV[8])
  redis.call('HSET', KEYS[4], digest, ARGV[9] .. '|' .. ARGV[5])
  redis.call('ZADD', KEYS[5], now + ttl, digest)
  redis.call('HINCRBY', KEYS[6], ARGV[9], ARGV[5])  -- as sent: a string, never '1e+17'
  for k = 4, 6 do redis.call('PEXPIRE', KEYS[k], ttl * 2) end
  result.r = true
end
return answer('ok', result)
