-- Release a reservation or a lease (settled by its event, expired, or returned): one
-- definition for the api's scripts and the aggregator's, which all do it.  A
-- reservation's value is `<meter>|<micro-units held>`; a lease's goes on with
-- `|<term grant>|<term end>|<term number>`, and only its first two parts matter here.

-- The meter and the micro-units (a string) a reservation's or a lease's value holds;
-- limits.lua, which may not write, counts expired ones out with it too.
local function holding(r)
  return string.match(r, '^([^|]*)|(%d+)')
end

local function release(reservations, expiries, held, digest)
  local r = redis.call('HGET', reservations, digest)
  if r then
    local meter, amount = holding(r)
    if amount ~= '0' then redis.call('HINCRBY', held, meter, '-' .. amount) end
    redis.call('HDEL', reservations, digest)
  end
  redis.call('ZREM', expiries, digest)
end
