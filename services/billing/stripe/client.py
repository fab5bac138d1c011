"""The Stripe client, and the Stripe objects Tally keeps ids of (``stripe_objects``).

Every create carries an idempotency key derived from Tally's own id, so a create that
timed out and is retried — by the SDK or by the next pass — returns the first object
instead of making a second one.  Calls are the SDK's synchronous ones, run in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import stripe
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

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


@dataclass(frozen=True, slots=True)
class Recorded:
    stripe_id: str
    digest: str  # what the object was made from; see ``digest``


async def recorded(conn: AsyncConnection, kind: str, key: str) -> Recorded | None:
    cur = await conn.execute(
        "SELECT stripe_id, digest FROM stripe_objects WHERE kind = %s AND key = %s", (kind, key)
    )
    row = await cur.fetchone()
    return Recorded(str(row[0]), str(row[1])) if row else None


async def stripe_id(conn: AsyncConnection, kind: str, key: str) -> str | None:
    found = await recorded(conn, kind, key)
    return found.stripe_id if found else None


async def remember(
    conn: AsyncConnection, kind: str, key: str, found: str, digest: str = ""
) -> None:
    await conn.execute(
        "INSERT INTO stripe_objects (kind, key, stripe_id, digest) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (kind, key) DO UPDATE SET stripe_id = excluded.stripe_id,"
        " digest = excluded.digest, synced_at = now()",
        (kind, key, found, digest),
    )


def digest(params: Any) -> str:
    """A fingerprint of create parameters: the same plan gives the same digest."""
    return hashlib.sha256(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


async def call(method: Callable[..., Any], *args: Any, idempotency_key: str = "") -> Any:
    """One SDK call, off the event loop."""
    options = {"idempotency_key": idempotency_key} if idempotency_key else {}
    return await asyncio.to_thread(method, *args, options)


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


async def ensure_new_customers(
    pool: AsyncConnectionPool, api: stripe.StripeClient, batch: int = 100
) -> int:
    """Create the Stripe customers of new sign-ups (oldest first); returns how many."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM customers c WHERE NOT EXISTS (SELECT 1 FROM stripe_objects o"
            " WHERE o.kind = 'customer' AND o.key = c.id) ORDER BY created_at LIMIT %s",
            (batch,),
        )
        fresh = [str(row[0]) for row in await cur.fetchall()]
        for customer in fresh:
            await ensure_customer(conn, api, customer)
            await conn.commit()
    return len(fresh)


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
    created = await call(create, params, idempotency_key=f"tally-{kind}-{key}")
    await remember(conn, kind, key, created.id)
    return str(created.id)
