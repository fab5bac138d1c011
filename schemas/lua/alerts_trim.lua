-- Trim the alert crossings a drainer published, only while they still head the list
-- (services/aggregator/alerts.py).  Two drainers of one list (a worker's start-up sweep
-- and the partition's owner) may publish the same crossings (same ids: harmless); a
-- blind LTRIM by the second would drop crossings it never read.
-- KEYS: the out list.  ARGV: the crossings published, as read from the list's head.
local n = #ARGV
local head = redis.call('LRANGE', KEYS[1], 0, n - 1)
if #head < n then return 0 end
for i = 1, n do
  if head[i] ~= ARGV[i] then return 0 end
end
redis.call('LTRIM', KEYS[1], n, -1)
return n
