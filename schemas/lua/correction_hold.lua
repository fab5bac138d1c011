-- A usage correction's check against what is counted, atomically (services/ingest/corrections.py):
-- the month counter's field, less the decreases accepted and not counted yet (held), plus
-- the change must stay at or above zero.  A decrease is held until the aggregator counts
-- its event and takes it off (increments.py), or for ARGV[4] seconds.
-- KEYS: 1 the meter's month counters  2 the customer's correction holds
-- ARGV: 1 counter field  2 hold field  3 micro-units: the change, or the month's total
--       to reach  4 'delta' | 'value'  5 hold ttl (s)
-- Replies {counted, held, change, accepted (1|0)}, amounts as decimal strings.
local counted = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
local change = tonumber(ARGV[3])
if ARGV[4] == 'value' then change = change - (counted - held) end
local function int(n) return string.format('%d', n) end
if counted - held + change < 0 then return {int(counted), int(held), int(change), 0} end
if change < 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], int(-change))
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return {int(counted), int(held), int(change), 1}
