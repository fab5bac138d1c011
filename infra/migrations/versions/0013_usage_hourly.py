"""Hourly rollups, which usage read in a time zone other than UTC composes into days.

A local day is not a UTC day: in New York it runs from 05:00 UTC (04:00 in summer) and
the day the clocks change lasts 23 or 25 hours.  Every zone whose offset is a whole
number of hours starts its days on a UTC hour, so its days and months are sums (or
maxima, minima) of UTC hours: Redis keeps live hours three days, ``usage_hourly`` keeps
the rest, recomputed with the day they belong to.  Rows exist from the first rollup
after this migration: ``tally billing rollup --from … --to …`` fills older days.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE usage_hourly (
            customer    text NOT NULL,
            meter       text NOT NULL REFERENCES meters (name) ON UPDATE CASCADE,
            hour        timestamptz NOT NULL,
            group_key   text NOT NULL DEFAULT '*',
            groups      jsonb NOT NULL DEFAULT '{}',
            value       numeric(38, 6) NOT NULL,
            latest_at   timestamptz,
            watermark   timestamptz NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (customer, meter, hour, group_key)
        );
        CREATE INDEX usage_hourly_customer_hour ON usage_hourly (customer, hour);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE usage_hourly")
