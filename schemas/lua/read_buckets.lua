-- read_buckets: many buckets' counters of one customer in one call (the usage API).
--
-- A pipeline of one HGET/HGETALL per bucket cost the usage API more CPU in redis-py
-- (packing each command, parsing each reply) than the rest of the request; one script
-- call is one command and one reply, whatever the number of buckets.
--
-- KEYS:    the buckets' counter hashes (``redis_keys.counters``), one customer's: one
--          hash slot, so this runs on Redis Cluster too.
-- ARGV[1]: the field to read from each (the total, ``*``), or "" for every field.
-- Returns one reply per key, in order: the field's value (nil when the key or field is
-- absent), or the whole hash as a flat field, value array (empty when absent).
local field = ARGV[1]
local found = {}
for i, key in ipairs(KEYS) do
    if field == '' then
        found[i] = redis.call('HGETALL', key)
    else
        found[i] = redis.call('HGET', key, field)
    end
end
return found
