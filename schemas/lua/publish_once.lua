-- Publish a notification unless its id was published within a while
-- (services/common/notify.py: publish_once).  The marker and the XADD are one call, so a
-- crash never leaves one without the other.
-- KEYS: the marker (hash-tagged into the stream's slot), the stream.
-- ARGV: how long the marker lasts (ms), the stream's approximate cap, the notification JSON.
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'n', ARGV[3])
  return 1
end
return 0
