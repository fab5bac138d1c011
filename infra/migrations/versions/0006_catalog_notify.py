"""The catalog announces its changes: NOTIFY ``tally_catalog`` when meters or plans change.

Every process caches the meters (``services.common.meter_cache``) and LISTENs on this
channel, so a meter added or changed is seen at once, without a restart and without a
query per request.  The trigger is per statement and the payload names the table:
PostgreSQL delivers a notification on commit and folds a transaction's identical ones
into one, so a seed upserting many meters wakes each listener once.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION notify_catalog() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('tally_catalog', TG_TABLE_NAME);
            RETURN NULL;
        END $$;

        CREATE TRIGGER meters_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON meters
            FOR EACH STATEMENT EXECUTE FUNCTION notify_catalog();
        CREATE TRIGGER plans_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON plans
            FOR EACH STATEMENT EXECUTE FUNCTION notify_catalog();
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TRIGGER plans_notify ON plans;"
        " DROP TRIGGER meters_notify ON meters;"
        " DROP FUNCTION notify_catalog()"
    )
