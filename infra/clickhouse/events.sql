-- Raw usage events: the record for audit, analytics SQL, rollups and re-rating.
-- One row per (customer, source, id), the idempotency key: a replayed or re-sent event
-- collapses, and every read uses FINAL. The version column makes the FIRST sighting
-- win (the earliest received_at ranks highest), as Redis de-duplication does, so a
-- client retry that re-stamps `time` cannot move an event to another day. There is no
-- time partitioning on purpose: ReplacingMergeTree only collapses rows within one
-- partition, and a retry may carry another event time.
-- `{database}` is replaced by the configured database name.
CREATE TABLE IF NOT EXISTS {database}.events
(
    customer    String,
    type        LowCardinality(String),
    source      String,
    id          String,
    time        DateTime64(6, 'UTC') COMMENT 'event time, from the CloudEvent',
    value       Decimal(38, 6),
    dimensions  Map(String, String) COMMENT 'top-level scalars of data, as strings',
    data        String DEFAULT '' COMMENT 'the event data as sent (JSON); empty before it was kept',
    catalog_version UInt64 DEFAULT 0 COMMENT 'meter catalog version ingest saw: meters made later back-fill events below theirs',
    received_at DateTime64(6, 'UTC') COMMENT 'ingest time',
    stored_at   DateTime64(6, 'UTC') DEFAULT now64(6) COMMENT 'when the aggregator wrote it',
    first_seen  UInt64 MATERIALIZED 18446744073709551615 - toUnixTimestamp64Micro(received_at)
        COMMENT 'version: higher for an earlier sighting',
    INDEX stored_at_minmax stored_at TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree(first_seen)
ORDER BY (customer, source, id)
