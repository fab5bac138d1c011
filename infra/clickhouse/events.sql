-- Raw usage events: the record for audit, analytics SQL, rollups and re-rating.
-- ReplacingMergeTree keyed by (customer, type, source, id): a replayed or duplicated
-- event collapses into one row; read with FINAL for exact numbers.
-- `{database}` is replaced by the configured database name.
CREATE TABLE IF NOT EXISTS {database}.events
(
    customer    String,
    type        LowCardinality(String),
    source      String,
    id          String,
    time        DateTime64(6, 'UTC') COMMENT 'event time, from the CloudEvent',
    value       Decimal(38, 6),
    dimensions  Map(String, String),
    received_at DateTime64(6, 'UTC') COMMENT 'ingest time',
    stored_at   DateTime64(6, 'UTC') DEFAULT now64(6) COMMENT 'when the aggregator wrote it',
    INDEX stored_at_minmax stored_at TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (customer, type, source, id)
