"""Meters as live data: filters, versions and their audit, archiving, catalog versions.

Meters were rows upserted from the YAML catalog at start-up.  The admin API now creates,
changes and archives them; every change is a new version kept in ``meter_versions`` (who,
when, the definition), like plans.  ``catalog_version`` is one row bumped in the same
transaction as each meter change: processes read it in the snapshot they read the
meters in, ingest stamps it on the events it accepts, and ``meters.counting_from`` — the
version that created a meter or last changed how it counts — tells the aggregator which
events a meter counts live and which the back-fill counts from history.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE meters
            DROP CONSTRAINT meters_aggregation_check,
            ADD CONSTRAINT meters_aggregation_check CHECK (aggregation IN
                ('count', 'sum', 'avg', 'min', 'max', 'latest', 'unique_count')),
            ADD COLUMN filters jsonb NOT NULL DEFAULT '{}',
            ADD COLUMN version integer NOT NULL DEFAULT 1,
            ADD COLUMN counting_from bigint NOT NULL DEFAULT 0,
            ADD COLUMN archived boolean NOT NULL DEFAULT false,
            ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();

        CREATE TABLE meter_versions (
            name        text NOT NULL REFERENCES meters (name),
            version     integer NOT NULL,
            definition  jsonb NOT NULL,
            changed_by  text NOT NULL,
            changed_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (name, version)
        );
        INSERT INTO meter_versions (name, version, definition, changed_by)
        SELECT name, 1, jsonb_build_object(
                   'name', name, 'description', description, 'event_type', event_type,
                   'aggregation', aggregation, 'value_property', value_property,
                   'group_by', to_jsonb(group_by), 'filters', filters, 'unit', unit),
               'catalog'
        FROM meters;

        CREATE TABLE catalog_version (
            one      boolean PRIMARY KEY DEFAULT true CHECK (one),
            version  bigint NOT NULL
        );
        INSERT INTO catalog_version (version) VALUES (0);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE catalog_version, meter_versions;
        DELETE FROM meters WHERE aggregation IN ('avg', 'min');
        ALTER TABLE meters
            DROP COLUMN filters, DROP COLUMN version, DROP COLUMN counting_from,
            DROP COLUMN archived, DROP COLUMN created_at,
            DROP CONSTRAINT meters_aggregation_check,
            ADD CONSTRAINT meters_aggregation_check CHECK (aggregation IN
                ('count', 'sum', 'max', 'latest', 'unique_count'));
        """
    )
