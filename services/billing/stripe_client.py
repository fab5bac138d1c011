"""The Stripe client, and the Stripe objects Tally keeps ids of (``stripe_objects``).

Every create carries an idempotency key derived from Tally's own id, so a create that
timed out and is retried — by the SDK or by the next pass — returns the first object
instead of making a second one.  Calls are the SDK's synchronous ones, run in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import stripe
from psycopg import AsyncConnection

from services.common.settings import Settings


def client(settings: Settings) -> stripe.StripeClient | None:
    """A client when ``STRIPE_API_KEY`` is set, else None: Stripe is optional."""
    if not settings.stripe_api_key:
        return None
    bases: dict[str, str] = {}
    if settings.stripe_api_base:
        bases["api"] = settings.stripe_api_base
    if settings.stripe_meter_events_base:
        bases["meter_events"] = settings.stripe_meter_events_base
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses=bases,  # type: ignore[arg-type]
        max_network_retries=0,  # Tally's outbox retries, with its own backoff
    )


def event_name(meter: str) -> str:
    return f"tally_{meter}"


async def stripe_id(conn: AsyncConnection, kind: str, key: str) -> str | None:
    cur = await conn.execute(
        "SELECT stripe_id FROM stripe_objects WHERE kind = %s AND key = %s", (kind, key)
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def remember(conn: AsyncConnection, kind: str, key: str, found: str) -> None:
    await conn.execute(
        "INSERT INTO stripe_objects (kind, key, stripe_id) VALUES (%s, %s, %s)"
        " ON CONFLICT (kind, key) DO UPDATE SET stripe_id = excluded.stripe_id, synced_at = now()",
        (kind, key, found),
    )


async def ensure_customer(conn: AsyncConnection, api: stripe.StripeClient, customer: str) -> str:
    """The customer's Stripe id, creating the Stripe customer the first time."""
    known = await stripe_id(conn, "customer", customer)
    if known:
        return known
    cur = await conn.execute("SELECT email, company FROM customers WHERE id = %s", (customer,))
    row = await cur.fetchone()
    if row is None:
        raise LookupError(f"no customer {customer!r}")
    params: Any = {
        "email": row[0],
        "name": row[1] or row[0],
        "metadata": {"tally_customer": customer},
    }
    return await _create(conn, "customer", customer, api.v1.customers.create, params)


async def ensure_meter(conn: AsyncConnection, api: stripe.StripeClient, meter: str) -> str:
    """The Billing Meter Tally pushes ``meter``'s usage to: summed daily deltas."""
    known = await stripe_id(conn, "meter", meter)
    if known:
        return known
    params: Any = {
        "display_name": meter,
        "event_name": event_name(meter),
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"},
    }
    return await _create(conn, "meter", meter, api.v1.billing.meters.create, params)


async def _create(
    conn: AsyncConnection, kind: str, key: str, create: Callable[..., Any], params: Any
) -> str:
    """Create the Stripe object under an idempotency key of Tally's id, and record it."""
    created = await asyncio.to_thread(create, params, {"idempotency_key": f"tally-{kind}-{key}"})
    await remember(conn, kind, key, created.id)
    return str(created.id)
