"""Who changed a plan, kept with the change: ``subscription_history.source`` and
``change_ref``.

``plan.changed`` is published after the commit that changed the plan; a crash in between
lost it.  Billing's lifecycle pass now re-tells recent changes from the history under the
id the immediate publish used, which needs the source (admin, stripe, trial_end) and, for
a Stripe event, its id.  The trigger that already records every change reads them from
transaction-local settings the code that makes the change sets
(``services.api.accounts.store.record_change``), so the history row and the change are one
commit; a change made without them (SQL by hand) records NULL and is not re-told.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE subscription_history ADD COLUMN source text, ADD COLUMN change_ref text;
        CREATE INDEX subscription_history_at ON subscription_history (at);

        CREATE OR REPLACE FUNCTION record_subscription() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO subscription_history (customer_id, at, plan_id, status, source, change_ref)
            VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NEW.created_at ELSE now() END,
                    NEW.plan_id, NEW.status,
                    nullif(current_setting('tally.change_source', true), ''),
                    nullif(current_setting('tally.change_ref', true), ''));
            RETURN NULL;
        END $$;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION record_subscription() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO subscription_history (customer_id, at, plan_id, status)
            VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NEW.created_at ELSE now() END,
                    NEW.plan_id, NEW.status);
            RETURN NULL;
        END $$;
        DROP INDEX subscription_history_at;
        ALTER TABLE subscription_history DROP COLUMN source, DROP COLUMN change_ref;
        """
    )
