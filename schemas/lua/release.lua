-- Release a reservation (settled by its event, or expired): one definition for the
-- api's enforcement script and the aggregator's, which both do it.
local function release(reservations, expiries, held, digest)
  local r = redis.call('HGET', reservations, digest)
  if r then
    local meter, amount = string.match(r, '^(.*)|(%d+)$')
    redis.call('HINCRBY', held, meter, '-' .. amount)
    redis.call('HDEL', reservations, digest)
  end
  redis.call('ZREM', expiries, digest)
end
