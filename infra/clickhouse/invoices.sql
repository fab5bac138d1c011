-- Invoices, copied from PostgreSQL (billing's truth) by the billing run, for analytics
-- SQL's `invoice_lines`. One row per invoice, its lines as parallel arrays, so that a
-- recomputed draft replaces all its lines at once (even when it has fewer than before):
-- the version is the invoice's computed_at, the newest row wins under FINAL.
-- Billing is the one writer; analytics reads it only through its view.
CREATE TABLE IF NOT EXISTS {database}.invoices
(
    customer         String,
    id               String,
    period           String COMMENT 'YYYY-MM: the month the period starts in',
    period_start     DateTime64(6, 'UTC'),
    period_end       DateTime64(6, 'UTC'),
    status           LowCardinality(String),
    currency         LowCardinality(String),
    total            Decimal(38, 6),
    line_kind        Array(LowCardinality(String)),
    line_plan        Array(String),
    line_meter       Array(String),
    line_description Array(String),
    line_start       Array(DateTime64(6, 'UTC')),
    line_end         Array(DateTime64(6, 'UTC')),
    line_quantity    Array(Decimal(38, 6)),
    line_billable    Array(Decimal(38, 6)),
    line_amount      Array(Decimal(38, 6)),
    version          UInt64 COMMENT 'computed_at, in microseconds'
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (customer, id)
