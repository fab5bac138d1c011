"""A customer's billing time zone: where its calendar periods start and end.

An IANA name whose offset is a whole number of hours (``schemas.zones``); UTC by default.
Periods start at local midnight — the 1st of the month for calendar plans, the anchor's
day for anniversary plans — and their usage is summed over those instants from the
hourly rollups, DST changes included.  It may be set until the customer's first invoice.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE customers ADD COLUMN timezone text NOT NULL DEFAULT 'UTC'")


def downgrade() -> None:
    op.execute("ALTER TABLE customers DROP COLUMN timezone")
