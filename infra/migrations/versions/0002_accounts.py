"""Accounts: plans (versioned), customers, API keys, and the audit log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- The current definition of each plan; every version is kept in plan_versions.
        CREATE TABLE plans (
            id          text PRIMARY KEY,
            version     integer NOT NULL CHECK (version > 0),
            definition  jsonb NOT NULL,
            archived    boolean NOT NULL DEFAULT false,
            updated_at  timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE plan_versions (
            plan_id     text NOT NULL REFERENCES plans (id),
            version     integer NOT NULL,
            definition  jsonb NOT NULL,
            changed_by  text NOT NULL,
            changed_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (plan_id, version)
        );

        CREATE TABLE customers (
            id              text PRIMARY KEY,
            email           text NOT NULL,
            company         text NOT NULL DEFAULT '',
            plan_id         text NOT NULL REFERENCES plans (id),
            status          text NOT NULL
                CHECK (status IN ('trial', 'active', 'past_due', 'suspended', 'cancelled')),
            trial_ends_at   timestamptz,
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now()
        );
        CREATE UNIQUE INDEX customers_email ON customers (lower(email));
        CREATE INDEX customers_plan ON customers (plan_id);

        -- Secrets are never stored: only an HMAC-SHA-256 of the key under a server pepper.
        CREATE TABLE api_keys (
            id          text PRIMARY KEY,
            customer_id text NOT NULL REFERENCES customers (id),
            hash        bytea NOT NULL UNIQUE,
            prefix      text NOT NULL,
            last4       text NOT NULL,
            name        text NOT NULL DEFAULT '',
            scopes      text[] NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz,
            revoked_at  timestamptz,
            replaced_by text REFERENCES api_keys (id)
        );
        CREATE INDEX api_keys_customer ON api_keys (customer_id);

        CREATE TABLE audit_log (
            id          bigserial PRIMARY KEY,
            at          timestamptz NOT NULL DEFAULT now(),
            actor       text NOT NULL,
            action      text NOT NULL,
            subject     text NOT NULL,
            detail      jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_log_subject ON audit_log (subject, at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE audit_log, api_keys, customers, plan_versions, plans")
