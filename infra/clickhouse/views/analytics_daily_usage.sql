-- Analytics SQL's `daily_usage`: one row per customer, event type and UTC day, from the
-- deduplicated events: how many events, and the sum of their values. It is computed at
-- read time, so it is never behind the raw events (the billing rollup into PostgreSQL,
-- per meter, is what invoices read).
CREATE OR REPLACE VIEW {database}.analytics_daily_usage AS
SELECT customer, type, toDate(time) AS day, count() AS events, sum(value) AS value
FROM {database}.events FINAL
GROUP BY customer, type, day
