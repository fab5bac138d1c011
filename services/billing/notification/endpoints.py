"""Webhook endpoints: where a customer's (or the seller's) notifications are sent.

A customer's endpoint receives that customer's notifications; a seller endpoint
(``customer_id`` NULL) receives every customer's.  Either may list the event types it
wants (``event_types``; NULL: all).  The secret is returned once, when the endpoint is
created or its secret rotated, and only ever used to sign.  Deleting is soft (the
delivery log still names the endpoint); deleting or disabling fails what was still queued
for it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import AsyncConnection
from psycopg.rows import class_row

from schemas.notifications import NotificationType
from schemas.problem_types import TOO_MANY_ENDPOINTS, UNKNOWN_ENDPOINT, UNKNOWN_EVENT_TYPE
from services.billing.notification import signing
from services.common.problems import Problem, invalid_field


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    customer_id: str | None
    url: str
    event_types: list[str] | None
    created_at: datetime
    disabled_at: datetime | None
    disabled_reason: str | None
    previous_secret_until: datetime | None


_COLUMNS = (
    "id, customer_id, url, event_types, created_at, disabled_at, disabled_reason,"
    " previous_secret_until"
)


def new_endpoint_id() -> str:
    return "ep_" + secrets.token_urlsafe(12)


def event_types(events: Sequence[str] | None) -> list[str] | None:
    """The types asked for, checked; ``None`` or empty: every type."""
    if not events:
        return None
    known = {t.value for t in NotificationType}
    for i, name in enumerate(events):
        if name not in known:
            raise invalid_field(
                f"body.events[{i}]",
                f"unknown event type {name!r}; known: {', '.join(sorted(known))}",
                UNKNOWN_EVENT_TYPE,
            )
    return sorted(set(events))


async def create(
    conn: AsyncConnection,
    customer: str | None,
    url: str,
    events: list[str] | None,
    limit: int,
) -> tuple[Endpoint, str]:
    """A new endpoint and its secret (shown this once).  A customer's endpoints are
    counted under a lock on the customer row, so two concurrent creations cannot both
    pass the limit."""
    if customer is not None:
        await conn.execute("SELECT 1 FROM customers WHERE id = %s FOR UPDATE", (customer,))
        cur = await conn.execute(
            "SELECT count(*) FROM webhook_endpoints WHERE customer_id = %s AND deleted_at IS NULL",
            (customer,),
        )
        row = await cur.fetchone()
        if row is not None and row[0] >= limit:
            raise Problem(
                TOO_MANY_ENDPOINTS,
                f"a customer has at most {limit} webhook endpoints; delete one first",
                limit=limit,
                errors=[{"field": "body.url", "reason": f"over the limit of {limit} endpoints"}],
            )
    secret = signing.new_secret()
    inserted = await conn.cursor(row_factory=class_row(Endpoint)).execute(
        "INSERT INTO webhook_endpoints (id, customer_id, url, event_types, secret)"
        f" VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
        (new_endpoint_id(), customer, url, events, secret),
    )
    created = await inserted.fetchone()
    assert created is not None
    return created, secret


async def listed(conn: AsyncConnection, customer: str | None) -> list[Endpoint]:
    cur = await conn.cursor(row_factory=class_row(Endpoint)).execute(
        f"SELECT {_COLUMNS} FROM webhook_endpoints"
        " WHERE customer_id IS NOT DISTINCT FROM %s AND deleted_at IS NULL ORDER BY created_at",
        (customer,),
    )
    return await cur.fetchall()


async def get(conn: AsyncConnection, customer: str | None, endpoint_id: str) -> Endpoint:
    """The endpoint of this customer (``None``: the seller's), or 404."""
    cur = await conn.cursor(row_factory=class_row(Endpoint)).execute(
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = %s"
        " AND customer_id IS NOT DISTINCT FROM %s AND deleted_at IS NULL",
        (endpoint_id, customer),
    )
    found = await cur.fetchone()
    if found is None:
        raise unknown_endpoint(endpoint_id)
    return found


def unknown_endpoint(endpoint_id: str) -> Problem:
    return Problem(
        UNKNOWN_ENDPOINT, f"no webhook endpoint {endpoint_id!r}", endpoint_id=endpoint_id
    )


async def delete(conn: AsyncConnection, customer: str | None, endpoint_id: str) -> None:
    await get(conn, customer, endpoint_id)
    await conn.execute(
        "UPDATE webhook_endpoints SET deleted_at = now() WHERE id = %s", (endpoint_id,)
    )
    await fail_queued(conn, endpoint_id, "the endpoint was deleted")


async def rotate(
    conn: AsyncConnection, customer: str | None, endpoint_id: str, overlap: timedelta
) -> tuple[Endpoint, str]:
    """A new secret (returned once); the old one keeps signing alongside for ``overlap``."""
    await get(conn, customer, endpoint_id)
    secret = signing.new_secret()
    cur = await conn.cursor(row_factory=class_row(Endpoint)).execute(
        "UPDATE webhook_endpoints SET previous_secret = secret, secret = %s,"
        " previous_secret_until = now() + %s"
        f" WHERE id = %s RETURNING {_COLUMNS}",
        (secret, overlap, endpoint_id),
    )
    rotated = await cur.fetchone()
    assert rotated is not None
    return rotated, secret


async def disable(conn: AsyncConnection, endpoint_id: str, reason: str) -> None:
    """Stop sending to an endpoint (a 410, or its owner's wish); what was queued fails."""
    await conn.execute(
        "UPDATE webhook_endpoints SET disabled_at = coalesce(disabled_at, now()),"
        " disabled_reason = %s WHERE id = %s",
        (reason, endpoint_id),
    )
    await fail_queued(conn, endpoint_id, f"endpoint disabled: {reason}")


async def enable(conn: AsyncConnection, customer: str | None, endpoint_id: str) -> Endpoint:
    await get(conn, customer, endpoint_id)
    await conn.execute(
        "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL WHERE id = %s",
        (endpoint_id,),
    )
    return await get(conn, customer, endpoint_id)


async def fail_queued(conn: AsyncConnection, endpoint_id: str, why: str) -> None:
    """Deliveries still waiting for this endpoint end as failed (a resend may revive them)."""
    await conn.execute(
        "UPDATE notification_deliveries SET state = 'failed', last_error = %s,"
        " leased_until = NULL WHERE endpoint_id = %s AND state = 'pending'",
        (why, endpoint_id),
    )
