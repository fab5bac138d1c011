"""Metering: meters, daily and monthly usage rollups, rollup watermarks.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE meters (
            name            text PRIMARY KEY,
            description     text NOT NULL DEFAULT '',
            event_type      text NOT NULL,
            aggregation     text NOT NULL
                CHECK (aggregation IN ('count', 'sum', 'max', 'latest', 'unique_count')),
            value_property  text NOT NULL DEFAULT 'value',
            group_by        text[] NOT NULL DEFAULT '{}',
            unit            text NOT NULL DEFAULT '',
            updated_at      timestamptz NOT NULL DEFAULT now()
        );

        -- One row per customer, meter, UTC day and group ('*' = all events of the day).
        CREATE TABLE usage_daily (
            customer    text NOT NULL,
            meter       text NOT NULL REFERENCES meters (name) ON UPDATE CASCADE,
            day         date NOT NULL,
            group_key   text NOT NULL DEFAULT '*',
            groups      jsonb NOT NULL DEFAULT '{}',
            value       numeric(38, 6) NOT NULL,
            latest_at   timestamptz,
            watermark   timestamptz NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (customer, meter, day, group_key)
        );
        CREATE INDEX usage_daily_meter_day ON usage_daily (meter, day);

        -- Calendar months, for aggregations that days cannot be combined into
        -- (unique_count) and for cheap month views.
        CREATE TABLE usage_monthly (
            customer    text NOT NULL,
            meter       text NOT NULL REFERENCES meters (name) ON UPDATE CASCADE,
            month       date NOT NULL CHECK (extract(day FROM month) = 1),
            group_key   text NOT NULL DEFAULT '*',
            groups      jsonb NOT NULL DEFAULT '{}',
            value       numeric(38, 6) NOT NULL,
            latest_at   timestamptz,
            watermark   timestamptz NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (customer, meter, month, group_key)
        );

        -- How far (in ClickHouse stored_at) the scheduled rollup has looked.
        CREATE TABLE rollup_state (
            name        text PRIMARY KEY,
            watermark   timestamptz NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE rollup_state, usage_monthly, usage_daily, meters")
