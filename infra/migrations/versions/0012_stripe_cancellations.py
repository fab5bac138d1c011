"""Meter events cancelled within Stripe's 24 hours, for a day whose usage went down;
usage Stripe was never sent, settled as money once Tally's invoice is final.

Stripe takes no negative meter event, but cancels one by its identifier within 24 hours
of taking it (a meter event adjustment).  When a day's usage goes down and every event
sent for it is that recent, the outbox queues one event of the day's whole new quantity
that first cancels them (``cancels``); they become ``cancelled`` once Stripe has.

What Stripe could not take (``adjustment`` rows: a later decrease, or usage older than
its 35 days) made its invoice of the period bill another quantity than Tally's: once
Tally's invoice is final, the difference in money goes to Stripe as an invoice item or
a credit note, once per invoice (``stripe_unsent``); ``queued_at`` tells the rows queued
before the invoice was final from the later ones, which corrections of the finalized
invoice settle.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE stripe_outbox
            ADD COLUMN cancels text[] NOT NULL DEFAULT '{}',
            ADD COLUMN queued_at timestamptz NOT NULL DEFAULT now(),
            DROP CONSTRAINT stripe_outbox_state_check,
            ADD CONSTRAINT stripe_outbox_state_check
                CHECK (state IN ('pending', 'sent', 'adjustment', 'failed', 'cancelled'));

        CREATE TABLE stripe_unsent (
            invoice_id  text PRIMARY KEY REFERENCES invoices (id),
            amount      numeric NOT NULL,
            stripe_id   text,
            settled_at  timestamptz NOT NULL DEFAULT now()
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE stripe_unsent;
        DELETE FROM stripe_outbox WHERE state = 'cancelled';
        ALTER TABLE stripe_outbox
            DROP COLUMN cancels,
            DROP COLUMN queued_at,
            DROP CONSTRAINT stripe_outbox_state_check,
            ADD CONSTRAINT stripe_outbox_state_check
                CHECK (state IN ('pending', 'sent', 'adjustment', 'failed'));
        """
    )
