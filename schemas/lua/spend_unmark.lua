-- Clear a customer's whole-invoice spend mark once it is handed over to billing
-- (services/aggregator/alerts.py), unless a batch bumped it meanwhile: that batch's usage
-- must be evaluated too, so its mark stays for the next hand-over.
-- KEYS: the mark.  ARGV: the value read before the hand-over.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
