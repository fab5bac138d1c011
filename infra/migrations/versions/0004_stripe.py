"""Stripe: ids of mirrored objects, the meter-event outbox, and the webhook inbox.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- Tally's objects and the Stripe ids they were created as (customer, product,
        -- price, meter), keyed by Tally's own id.
        CREATE TABLE stripe_objects (
            kind        text NOT NULL,
            key         text NOT NULL,
            stripe_id   text NOT NULL,
            synced_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (kind, key)
        );

        -- How much of each customer-meter-day has been queued for Stripe, and at which
        -- revision: the rollup queues the difference when a day's usage changes.
        CREATE TABLE stripe_usage_queued (
            customer_id text NOT NULL,
            meter       text NOT NULL,
            day         date NOT NULL,
            quantity    numeric NOT NULL,
            revision    integer NOT NULL,
            PRIMARY KEY (customer_id, meter, day)
        );

        -- Meter events to send.  The identifier is (customer, meter, day, revision):
        -- a retry, or a resend after a crash between sending and recording it, carries
        -- the identifier Stripe has already seen, and Stripe drops it.
        CREATE TABLE stripe_outbox (
            id              bigserial PRIMARY KEY,
            identifier      text NOT NULL UNIQUE,
            customer_id     text NOT NULL,
            meter           text NOT NULL,
            day             date NOT NULL,
            revision        integer NOT NULL,
            quantity        numeric NOT NULL,
            event_at        timestamptz NOT NULL,
            state           text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'sent', 'adjustment', 'failed')),
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            last_error      text,
            sent_at         timestamptz
        );
        CREATE INDEX stripe_outbox_due ON stripe_outbox (next_attempt_at) WHERE state = 'pending';

        -- Every webhook event once, by id: a redelivery finds its row and changes nothing.
        CREATE TABLE stripe_inbox (
            event_id     text PRIMARY KEY,
            type         text NOT NULL,
            created      timestamptz NOT NULL,
            received_at  timestamptz NOT NULL DEFAULT now(),
            outcome      text NOT NULL,
            payload      jsonb NOT NULL
        );

        -- The newest Stripe event applied to each customer: an older one arriving late
        -- must not undo it.
        CREATE TABLE stripe_customer_events (
            customer_id text PRIMARY KEY REFERENCES customers (id),
            created     timestamptz NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE stripe_customer_events, stripe_inbox, stripe_outbox,"
        " stripe_usage_queued, stripe_objects"
    )
