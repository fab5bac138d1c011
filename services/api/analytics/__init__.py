"""Analytics SQL: a customer's (or the seller's) own SELECT over Tally's raw events and
rollups, guarded, tenant-bound and limited (``docs/analytics.md``)."""
