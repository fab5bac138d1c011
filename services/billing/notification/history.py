"""The delivery log: notifications with their deliveries and every attempt, and resend.

What a customer (or the seller) reads to answer "did my webhook go out, and what did my
server say?": per notification its payload, and per channel the state, the attempts
(status, the start of the response, the error, how long it took) and when the next
attempt is due.  A customer's key sees its own channels only (not the seller's endpoints).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from pydantic import BaseModel

from schemas.problem_types import UNKNOWN_NOTIFICATION
from services.common.problems import Problem


class AttemptLog(BaseModel):
    attempted_at: datetime
    status: int | None
    response: str | None
    error: str | None
    duration_ms: int


class DeliveryLog(BaseModel):
    id: int
    channel: str
    endpoint_id: str | None
    recipient: str
    state: str
    attempts: int
    next_attempt_at: datetime | None  # when the next attempt is due (pending only)
    last_status: int | None
    last_response: str | None
    last_error: str | None
    attempt_log: list[AttemptLog]


class NotificationLog(BaseModel):
    id: str
    type: str
    customer: str
    occurred_at: datetime
    created_at: datetime
    payload: dict[str, Any]
    deliveries: list[DeliveryLog]


_NOTIFICATIONS = """
    SELECT id, type, customer_id AS customer, occurred_at, created_at, payload
    FROM notifications
    WHERE (%(customer)s::text IS NULL OR customer_id = %(customer)s)
      AND (%(before)s::timestamptz IS NULL OR (created_at, id) < (%(before)s, %(before_id)s))
    ORDER BY created_at DESC, id DESC LIMIT %(limit)s
"""

_DELIVERIES = """
    SELECT d.id, d.notification_id, d.channel, d.endpoint_id, d.recipient, d.state,
           d.attempts, CASE WHEN d.state IN ('pending', 'sending') THEN d.next_attempt_at
           END AS next_attempt_at, d.last_status, d.last_response, d.last_error
    FROM notification_deliveries d
    LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
    WHERE d.notification_id = ANY(%(ids)s)
      AND (NOT %(own)s OR d.channel = 'email' OR e.customer_id IS NOT NULL)
    ORDER BY d.id
"""

_ATTEMPTS = """
    SELECT delivery_id, attempted_at, status, response, error, duration_ms
    FROM delivery_attempts WHERE delivery_id = ANY(%s) ORDER BY id
"""


async def page(
    conn: AsyncConnection,
    customer: str | None,
    limit: int,
    before: tuple[datetime, str] | None,
    own: bool,
) -> list[NotificationLog]:
    """A customer's (``None``: every customer's) notifications, newest first, ``limit``
    after the cursor ``before``."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        _NOTIFICATIONS,
        {
            "customer": customer,
            "before": before[0] if before else None,
            "before_id": before[1] if before else None,
            "limit": limit,
        },
    )
    return await _with_deliveries(conn, await cur.fetchall(), own)


async def one(conn: AsyncConnection, notification_id: str, own: bool) -> NotificationLog:
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT id, type, customer_id AS customer, occurred_at, created_at, payload"
        " FROM notifications WHERE id = %s",
        (notification_id,),
    )
    found = await _with_deliveries(conn, await cur.fetchall(), own)
    if not found:
        raise unknown_notification(notification_id)
    return found[0]


async def customer_of(conn: AsyncConnection, notification_id: str) -> str:
    cur = await conn.execute(
        "SELECT customer_id FROM notifications WHERE id = %s", (notification_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise unknown_notification(notification_id)
    return str(row[0])


def unknown_notification(notification_id: str) -> Problem:
    return Problem(
        UNKNOWN_NOTIFICATION,
        f"no notification {notification_id!r}",
        notification_id=notification_id,
    )


async def _with_deliveries(
    conn: AsyncConnection, rows: list[dict[str, Any]], own: bool
) -> list[NotificationLog]:
    ids = [row["id"] for row in rows]
    cur = await conn.cursor(row_factory=dict_row).execute(_DELIVERIES, {"ids": ids, "own": own})
    deliveries = await cur.fetchall()
    cur = await conn.cursor(row_factory=dict_row).execute(
        _ATTEMPTS, ([d["id"] for d in deliveries],)
    )
    attempts: dict[int, list[AttemptLog]] = {}
    for a in await cur.fetchall():
        attempts.setdefault(a.pop("delivery_id"), []).append(AttemptLog(**a))
    by_notification: dict[str, list[DeliveryLog]] = {}
    for d in deliveries:
        log = DeliveryLog(**d, attempt_log=attempts.get(d["id"], []))
        by_notification.setdefault(d["notification_id"], []).append(log)
    return [NotificationLog(**row, deliveries=by_notification.get(row["id"], [])) for row in rows]


async def resend(conn: AsyncConnection, notification_id: str, own: bool) -> int:
    """Every delivery of the notification (a key: its own channels) due again now, with
    the whole schedule ahead; the attempts already made stay in the log."""
    cur = await conn.execute(
        "UPDATE notification_deliveries d SET state = 'pending', next_attempt_at = now(),"
        " attempts = 0, leased_until = NULL"
        " WHERE d.notification_id = %(id)s AND d.state <> 'sending'"
        "   AND (NOT %(own)s OR d.channel = 'email' OR EXISTS (SELECT 1 FROM webhook_endpoints e"
        "        WHERE e.id = d.endpoint_id AND e.customer_id IS NOT NULL))",
        {"id": notification_id, "own": own},
    )
    return cur.rowcount
