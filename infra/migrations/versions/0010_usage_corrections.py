"""Usage corrections: the record of every signed change made to what a meter counted.

Ingest owns the table.  A row is written once the correction event it describes is
durable (Kafka, and ingest's write-ahead log with the embedded broker): the event is
what every count adds; the row is the audit — who, when, why, against what was counted
then — and what makes a retried request with the same id answer the first correction
instead of making a second one.  Rows are never updated or deleted.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE usage_corrections (
            id          text PRIMARY KEY,
            customer_id text NOT NULL,
            meter       text NOT NULL,
            at          timestamptz NOT NULL,
            groups      jsonb NOT NULL DEFAULT '{}',
            delta       numeric NOT NULL CHECK (delta <> 0),
            counted     numeric NOT NULL,
            reason      text NOT NULL,
            actor       text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX usage_corrections_customer ON usage_corrections (customer_id, at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE usage_corrections")
