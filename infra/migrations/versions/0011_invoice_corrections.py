"""Finalized invoices corrected after the fact: charges on a later invoice, credit notes.

Billing owns both tables.  A finalized invoice is never changed: when its period's usage
changes later (a usage correction, an event arriving late), billing rates the period
again and records the difference in ``invoice_corrections`` — a ``charge`` that the
customer's next invoice carries as correction lines (``billed_on`` names it once that
invoice is finalized), or a ``credit_note`` against the corrected invoice.
``invoice_checks`` keeps, per finalized invoice, the rollup watermark its period was
last rated again at, so an unchanged period is not rated twice.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE invoice_corrections (
            id              text PRIMARY KEY,
            invoice_id      text NOT NULL REFERENCES invoices (id),
            customer_id     text NOT NULL,
            kind            text NOT NULL CHECK (kind IN ('charge', 'credit_note')),
            period_start    timestamptz NOT NULL,
            period_end      timestamptz NOT NULL,
            currency        text NOT NULL,
            amount          numeric NOT NULL CHECK (amount <> 0),
            lines           jsonb NOT NULL,
            billed_on       text REFERENCES invoices (id),
            stripe_id       text,
            created_at      timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX invoice_corrections_customer ON invoice_corrections (customer_id, created_at);
        CREATE INDEX invoice_corrections_invoice ON invoice_corrections (invoice_id);

        CREATE TABLE invoice_checks (
            invoice_id      text PRIMARY KEY REFERENCES invoices (id),
            checked_through timestamptz NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE invoice_checks, invoice_corrections")
