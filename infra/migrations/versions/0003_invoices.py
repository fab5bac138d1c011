"""Billing: subscription history, invoices, and billing runs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- Every plan and status a customer has had, and since when: the billing run
        -- prorates and splits periods on it.  Kept by triggers, so no code path that
        -- changes a customer can forget it.
        CREATE TABLE subscription_history (
            customer_id text NOT NULL REFERENCES customers (id),
            seq         bigserial,
            at          timestamptz NOT NULL,
            plan_id     text NOT NULL,
            status      text NOT NULL,
            PRIMARY KEY (customer_id, seq)
        );

        CREATE FUNCTION record_subscription() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO subscription_history (customer_id, at, plan_id, status)
            VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NEW.created_at ELSE now() END,
                    NEW.plan_id, NEW.status);
            RETURN NULL;
        END $$;

        CREATE TRIGGER customers_history_insert AFTER INSERT ON customers
            FOR EACH ROW EXECUTE FUNCTION record_subscription();
        CREATE TRIGGER customers_history_update AFTER UPDATE OF plan_id, status ON customers
            FOR EACH ROW
            WHEN (OLD.plan_id IS DISTINCT FROM NEW.plan_id
                  OR OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION record_subscription();

        INSERT INTO subscription_history (customer_id, at, plan_id, status)
        SELECT id, created_at, plan_id, status FROM customers;

        -- One invoice per customer and period.  A draft is recomputed when usage
        -- changes; from finalized on it is never recomputed.
        CREATE TABLE invoices (
            id              text PRIMARY KEY,
            customer_id     text NOT NULL REFERENCES customers (id),
            period          text NOT NULL CHECK (period ~ '^[0-9]{4}-[0-9]{2}$'),
            period_start    timestamptz NOT NULL,
            period_end      timestamptz NOT NULL CHECK (period_end > period_start),
            status          text NOT NULL
                CHECK (status IN ('draft', 'finalized', 'paid', 'payment_failed', 'void')),
            currency        text NOT NULL,
            lines           jsonb NOT NULL,
            subtotal        numeric NOT NULL,  -- as rounded: scale of the currency
            total           numeric NOT NULL,
            computed_at     timestamptz NOT NULL DEFAULT now(),
            finalized_at    timestamptz,
            paid_at         timestamptz,
            stripe_invoice_id text UNIQUE,
            UNIQUE (customer_id, period_start)
        );
        CREATE INDEX invoices_period_status ON invoices (period, status);

        -- A billing run works through customers in id order and records how far it got
        -- in the same transaction as each batch of invoices: a crashed run resumes there.
        CREATE TABLE billing_runs (
            period      text PRIMARY KEY,
            started_at  timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            cursor      text NOT NULL DEFAULT '',
            invoices    integer NOT NULL DEFAULT 0
        );
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE billing_runs, invoices, subscription_history;"
        " DROP FUNCTION record_subscription()"
    )
