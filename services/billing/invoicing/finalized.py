"""``invoice.finalized``: told once an invoice is frozen, by whoever froze it.

The billing run publishes after the transaction that finalized the invoices commits; a
crash between the commit and the publish would lose the notification, so the billing
service's lifecycle scan (``notification.lifecycle``) publishes every invoice finalized
in the last days again, by the same stable id: the stream carries it once
(``publish_once``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from psycopg import AsyncConnection
from redis.asyncio import Redis

from schemas.notifications import Notification, NotificationType, moment
from services.common.notify import publish_once

KIND = NotificationType.INVOICE_FINALIZED
REMEMBER = timedelta(days=35)
"""How long a told invoice is remembered: longer than the scan looks back."""
RETURNING = " RETURNING id, customer_id, period_start, period_end, total, currency, finalized_at"
Row = tuple[str, str, datetime, datetime, Decimal, str, datetime]

_RECENT = (
    "SELECT id, customer_id, period_start, period_end, total, currency, finalized_at"
    " FROM invoices WHERE finalized_at >= %s AND status <> 'void' ORDER BY finalized_at"
)


def notice(row: Row) -> Notification:
    invoice, customer, start, end, total, currency, finalized_at = row
    return Notification.decided(
        KIND,
        customer,
        (invoice,),
        finalized_at,
        {
            "invoice_id": invoice,
            "period": {"start": moment(start), "end": moment(end)},
            "total": format(total, "f"),
            "currency": currency,
        },
    )


async def tell(redis: Redis, rows: list[Row]) -> int:
    """Publish each finalized invoice (once); the number published now."""
    told = 0
    for row in rows:
        told += await publish_once(redis, notice(row), REMEMBER)
    return told


async def finalized_since(conn: AsyncConnection, since: datetime) -> list[Row]:
    cur = await conn.execute(_RECENT, (since,))
    return [tuple(row) for row in await cur.fetchall()]
