-- rank_buckets: the groups that may be among the top N of many buckets, and their values.
--
-- A top 5 of a month of 20 endpoints read every group of every bucket into the usage
-- API (651 values parsed in Python to keep 155); ranking here sends back only the
-- groups that can be in the top N.  Lua's numbers are doubles, inexact beyond 2^53
-- micro-units, so this only narrows: it keeps every group whose folded value is within a
-- tolerance of the N-th largest (ties included), and returns their exact values as
-- Redis holds them.  The API ranks those exactly (``services.api.usage.ranking``), with
-- its own tie rule, and gets the same answer as from every group.
--
-- KEYS:    the buckets' counter hashes (``redis_keys.counters``), one customer's, oldest
--          first: one hash slot, so this runs on Redis Cluster too.
-- ARGV[1]: how buckets fold into a group's value: "sum", "max", "min" or "latest" (the
--          newest bucket's), as ``ranking.totals`` folds them.
-- ARGV[2]: N, how many groups the caller keeps.
-- Returns {fields, bucket_1, ..., bucket_k}: the kept groups' hash fields, then per key
-- nil when the key is absent, else its values of those fields in the same order (nil
-- where a bucket has no such group).  The total (``*``) and the ``@t`` time fields
-- are not groups.
--
-- Its cost is Redis's: 31 HGETALLs of 21 fields take 120 µs of a top 5's ~330, the fold
-- the rest.  So the fold keeps one double per group (no table of magnitudes: one running
-- sum of every value's magnitude bounds the rounding of all of them, a wider tolerance
-- that is as sound) and no copy of each bucket's cells: the kept groups' values are
-- read again with one HMGET per bucket (~300 µs in all, measured).
local tonumber, byte = tonumber, string.byte
local CLOSE = 93  -- ']': group fields are JSON arrays; the total and times end otherwise
local how = ARGV[1]
local limit = tonumber(ARGV[2])
local present = {} -- per key: whether it exists
local fields = {}  -- every group, in the order first seen
local folded = {}  -- field -> its value over the buckets, as a double
local magnitude = 0  -- the sum of every value's magnitude: bounds every fold's rounding
for i, key in ipairs(KEYS) do
    local flat = redis.call('HGETALL', key)
    present[i] = #flat > 0
    for j = 1, #flat, 2 do
        local field = flat[j]
        if byte(field, -1) == CLOSE then
            local value = tonumber(flat[j + 1])
            if value < 0 then magnitude = magnitude - value else magnitude = magnitude + value end
            local before = folded[field]
            if before == nil then
                fields[#fields + 1] = field
                folded[field] = value
            elseif how == 'sum' then
                folded[field] = before + value
            elseif how == 'latest' then
                folded[field] = value
            elseif how == 'max' then
                if value > before then folded[field] = value end
            elseif value < before then  -- 'min'
                folded[field] = value
            end
        end
    end
end

local kept = fields
if #fields > limit then
    local values = {}
    for i, field in ipairs(fields) do
        values[i] = folded[field]
    end
    table.sort(values, function(a, b) return a > b end)
    -- Each value and each sum is rounded by at most 2^-53 relative to the magnitudes
    -- added: at most MAX_BUCKETS (2,000) x 2^-53 of them all, far under 1e-9 of it.
    local floor = values[limit] - (magnitude * 1e-9 + 1)
    kept = {}
    for _, field in ipairs(fields) do
        if folded[field] >= floor then kept[#kept + 1] = field end
    end
end

-- HMGET in chunks: Lua unpacks a few thousand values at most, and ties keep every group
-- tied (ten thousand users with one call each are all a top 5).
local CHUNK = 1000
local function values_of(key)
    if #kept == 0 then return {} end
    if #kept <= CHUNK then return redis.call('HMGET', key, unpack(kept)) end
    local row = {}
    for first = 1, #kept, CHUNK do
        local part = redis.call('HMGET', key, unpack(kept, first, math.min(first + CHUNK - 1, #kept)))
        for _, value in ipairs(part) do row[#row + 1] = value end
    end
    return row
end

local reply = {kept}
for i, key in ipairs(KEYS) do
    reply[i + 1] = present[i] and values_of(key) or false
end
return reply
