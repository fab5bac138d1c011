"""Meter events cancelled within Stripe's 24 hours, for a day whose usage went down.

Stripe takes no negative meter event, but cancels one by its identifier within 24 hours
of taking it (a meter event adjustment).  When a day's usage goes down and every event
sent for it is that recent, the outbox queues one event of the day's whole new quantity
that first cancels them (``cancels``); they become ``cancelled`` once Stripe has.

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
            DROP CONSTRAINT stripe_outbox_state_check,
            ADD CONSTRAINT stripe_outbox_state_check
                CHECK (state IN ('pending', 'sent', 'adjustment', 'failed', 'cancelled'));
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DELETE FROM stripe_outbox WHERE state = 'cancelled';
        ALTER TABLE stripe_outbox
            DROP COLUMN cancels,
            DROP CONSTRAINT stripe_outbox_state_check,
            ADD CONSTRAINT stripe_outbox_state_check
                CHECK (state IN ('pending', 'sent', 'adjustment', 'failed'));
        """
    )
