"""What a Stripe webhook's decision tells the customer: ``payment.failed`` and
``plan.changed`` (built by the accounts service), collected while the event is applied
and published after its commit.

A crash between that commit and the publish would lose a ``payment.failed``; the
billing service's lifecycle pass (``retell``) publishes every failed payment applied in
the last ``LOOK_BACK`` again, from the inbox, by the same stable id (``publish_once``:
the stream carries it once).  A lost ``plan.changed`` is not re-told: the plan it came
from is no longer known."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from psycopg import AsyncConnection
from redis.asyncio import Redis

from schemas.notifications import Notification, NotificationType
from services.billing.rating.money import exponent
from services.common.notify import publish_once

LOOK_BACK = timedelta(days=7)
REMEMBER = timedelta(days=10)
"""How long a told event is remembered: longer than ``retell`` looks back."""

_APPLIED_FAILURES = """
    SELECT i.event_id, i.created, o.key, i.payload->'data'->'object'
    FROM stripe_inbox i
    JOIN stripe_objects o
      ON o.kind = 'customer' AND o.stripe_id = i.payload->'data'->'object'->>'customer'
    WHERE i.type = 'invoice.payment_failed' AND i.outcome LIKE 'applied%%'
      AND i.created >= %s
    ORDER BY i.created
"""


@dataclass(frozen=True, slots=True)
class Teller:
    """The notifications one Stripe event (``event_id``) decided, in ``told``."""

    event_id: str
    at: datetime
    told: list[Notification]

    def add(self, note: Notification | None) -> None:
        if note is not None:
            self.told.append(note)

    def payment_failed(self, customer: str, invoice: dict[str, Any]) -> None:
        """The account is past due: ``amount_due`` in money (Stripe sends minor units),
        ``invoice_id`` Tally's invoice when Stripe's names one."""
        currency = str(invoice.get("currency") or "usd").lower()
        due = Decimal(int(invoice.get("amount_due") or 0)).scaleb(-exponent(currency))
        kind = NotificationType.PAYMENT_FAILED
        self.told.append(
            Notification.decided(
                kind,
                customer,
                (self.event_id,),
                self.at,
                {
                    "invoice_id": (invoice.get("metadata") or {}).get("tally_invoice"),
                    "stripe_invoice_id": invoice.get("id"),
                    "amount_due": format(due, "f"),
                    "currency": currency,
                    "status": "past_due",
                    "attempt_count": invoice.get("attempt_count"),
                    "hosted_invoice_url": invoice.get("hosted_invoice_url"),
                },
            )
        )


async def retell(conn: AsyncConnection, redis: Redis, now: datetime) -> int:
    """Publish every failed payment applied since ``now - LOOK_BACK`` not yet on the
    stream; the number published now."""
    cur = await conn.execute(_APPLIED_FAILURES, (now - LOOK_BACK,))
    told = 0
    for event_id, created, customer, invoice in await cur.fetchall():
        teller = Teller(event_id, created, [])
        teller.payment_failed(customer, invoice)
        for note in teller.told:
            told += await publish_once(redis, note, REMEMBER)
    return told
