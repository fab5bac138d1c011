-- Release a reservation or a lease (settled by its event, expired, or returned): one
-- definition for the api's scripts and the aggregator's, which all do it.  A
-- reservation's value is `<meter>|<micro-units held>`; a lease's goes on with
-- `|<term grant>|<term end>`, and only its first two parts matter here.
local function release(reservations, expiries, held, digest)
  local r = redis.call('HGET', reservations, digest)
  if r then
    local meter, amount = string.match(r, '^([^|]*)|(%d+)')
    if amount ~= '0' then redis.call('HINCRBY', held, meter, '-' .. amount) end
    redis.call('HDEL', reservations, digest)
  end
  redis.call('ZREM', expiries, digest)
end
