"""The rollup: raw events in ClickHouse into ``usage_daily`` and ``usage_monthly`` in PostgreSQL."""
