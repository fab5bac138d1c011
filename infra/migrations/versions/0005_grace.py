"""Since when a customer has had its status, and a digest of each mirrored Stripe object.

``status_since`` is what a grace period counts from: a past_due account is refused once
it has been past_due longer than ``TALLY_PAST_DUE_GRACE_HOURS``.  A trigger keeps it, so
every path that changes a status (admin, trial expiry, Stripe webhooks) moves it.

``stripe_objects.digest`` fingerprints what an object was created from: Stripe prices
cannot be edited, so a plan change shows up as a new digest and a new price.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE customers ADD COLUMN status_since timestamptz;
        UPDATE customers c SET status_since = coalesce(
            (SELECT max(h.at) FROM subscription_history h
             WHERE h.customer_id = c.id AND h.status = c.status), c.created_at);
        ALTER TABLE customers ALTER COLUMN status_since SET NOT NULL,
                              ALTER COLUMN status_since SET DEFAULT now();

        CREATE FUNCTION stamp_status() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.status_since := now();
            RETURN NEW;
        END $$;

        CREATE TRIGGER customers_status_since BEFORE UPDATE OF status ON customers
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION stamp_status();

        ALTER TABLE stripe_objects ADD COLUMN digest text NOT NULL DEFAULT '';
        """
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE stripe_objects DROP COLUMN digest;"
        " DROP TRIGGER customers_status_since ON customers;"
        " DROP FUNCTION stamp_status();"
        " ALTER TABLE customers DROP COLUMN status_since"
    )
