-- Columns added to `events` after its first release: a table created by an older Tally
-- gains them here (events.sql's CREATE ... IF NOT EXISTS leaves an existing table as
-- it is). Rows stored before have `data` empty and `catalog_version` 0.
ALTER TABLE {database}.events
    ADD COLUMN IF NOT EXISTS data String DEFAULT '' COMMENT 'the event data as sent (JSON); empty before it was kept',
    ADD COLUMN IF NOT EXISTS catalog_version UInt64 DEFAULT 0 COMMENT 'meter catalog version ingest saw: meters made later back-fill events below theirs'
