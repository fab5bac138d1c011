-- Analytics SQL's `events`: the raw usage events, deduplicated (FINAL collapses a replayed
-- or re-sent event to its first sighting), under a name that stays while the table
-- behind it changes. The guard reads it only through a subquery that filters by
-- customer; ClickHouse pushes that filter down to the table's primary key.
-- Views come after the tables (`create_schema` applies `views/` last) and are replaced
-- on every start, so a new Tally brings its new definition.
CREATE OR REPLACE VIEW {database}.analytics_events AS
SELECT customer, type, source, id, time, value, dimensions, data, received_at, stored_at
FROM {database}.events FINAL
