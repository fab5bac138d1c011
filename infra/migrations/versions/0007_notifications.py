"""Notifications: alert rules, webhook endpoints, the notification outbox and its deliveries.

Owned by ``services.billing.notification``.  A notification is stored once under its
stable id (``schemas.notifications.notification_id``); each channel that must carry it
(a webhook endpoint, the customer's email) gets one delivery row, retried on a schedule;
every attempt is logged.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- Thresholds a customer (or the seller, for a customer) added beyond the plan's
        -- defaults.  kind: percent (of the quota, else of the included units), usage
        -- (absolute, in the meter's unit) or spend (money, the invoice to date).
        CREATE TABLE alert_rules (
            id          text PRIMARY KEY,
            customer_id text NOT NULL REFERENCES customers (id),
            meter       text,
            kind        text NOT NULL CHECK (kind IN ('percent', 'usage', 'spend')),
            thresholds  numeric[] NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX alert_rules_customer ON alert_rules (customer_id);

        -- Where webhooks go: a customer's endpoints, or the seller's (customer_id NULL).
        -- event_types NULL = every type.
        CREATE TABLE webhook_endpoints (
            id              text PRIMARY KEY,
            customer_id     text REFERENCES customers (id),
            url             text NOT NULL,
            event_types     text[],
            secret          text NOT NULL,
            -- After a rotation the old secret still signs (a second v1 signature)
            -- until previous_secret_until, so receivers can switch without a gap.
            previous_secret       text,
            previous_secret_until timestamptz,
            created_at      timestamptz NOT NULL DEFAULT now(),
            disabled_at     timestamptz,
            disabled_reason text,
            deleted_at      timestamptz
        );
        CREATE INDEX webhook_endpoints_customer ON webhook_endpoints (customer_id)
            WHERE deleted_at IS NULL;

        -- Each notification once, under its stable id; the payload as it will be sent.
        CREATE TABLE notifications (
            id          text PRIMARY KEY,
            type        text NOT NULL,
            customer_id text NOT NULL,
            occurred_at timestamptz NOT NULL,
            payload     jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX notifications_customer ON notifications (customer_id, created_at DESC);

        -- One row per channel that must carry a notification.
        CREATE TABLE notification_deliveries (
            id              bigserial PRIMARY KEY,
            notification_id text NOT NULL REFERENCES notifications (id),
            channel         text NOT NULL CHECK (channel IN ('webhook', 'email')),
            endpoint_id     text REFERENCES webhook_endpoints (id),
            recipient       text NOT NULL,
            state           text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'sending', 'succeeded', 'failed')),
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            last_attempt_at timestamptz,
            last_status     integer,
            last_response   text,
            last_error      text,
            -- A 'sending' row whose lease has run out was left by a crashed worker: it
            -- is sent again, under the same webhook-id.
            leased_until    timestamptz,
            succeeded_at    timestamptz,
            UNIQUE (notification_id, channel, recipient)
        );
        CREATE INDEX notification_deliveries_due ON notification_deliveries (next_attempt_at)
            WHERE state = 'pending';
        CREATE INDEX notification_deliveries_leased ON notification_deliveries (leased_until)
            WHERE state = 'sending';
        CREATE INDEX notification_deliveries_endpoint ON notification_deliveries (endpoint_id)
            WHERE state IN ('pending', 'sending');

        -- Every attempt, for the delivery log.
        CREATE TABLE delivery_attempts (
            id           bigserial PRIMARY KEY,
            delivery_id  bigint NOT NULL REFERENCES notification_deliveries (id),
            attempted_at timestamptz NOT NULL DEFAULT now(),
            status       integer,
            response     text,
            error        text,
            duration_ms  integer NOT NULL
        );
        CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE delivery_attempts;
        DROP TABLE notification_deliveries;
        DROP TABLE notifications;
        DROP TABLE webhook_endpoints;
        DROP TABLE alert_rules;
        """
    )
