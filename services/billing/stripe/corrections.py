"""Corrections of finalized invoices, told to Stripe as money (``invoicing.corrections``).

Stripe never puts usage with a past timestamp on an invoice it has finalized, and takes
no negative meter event, so what Tally books after an invoice is final reaches Stripe as
money (``money``): a charge as an invoice item for the corrected period, a credit note
on Stripe's invoice of it (or a negative invoice item), under the idempotency key
``tally-correction-{id}``, its Stripe id recorded in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import stripe
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.billing.stripe import money
from services.billing.stripe.money import Owed
from services.common.logging import get_logger

log = get_logger("tally.stripe")

_WAITING = """
    SELECT c.id, c.customer_id, c.kind, c.invoice_id, c.period_start, c.period_end,
           c.currency, c.amount, i.stripe_invoice_id
    FROM invoice_corrections c JOIN invoices i ON i.id = c.invoice_id
    WHERE c.stripe_id IS NULL
    ORDER BY c.created_at, c.id
    LIMIT %s
"""


@dataclass(frozen=True, slots=True)
class Waiting:
    id: str
    customer: str
    kind: str
    invoice_id: str
    period_start: datetime
    period_end: datetime
    currency: str
    amount: Decimal  # signed: a credit note's is negative
    stripe_invoice: str | None

    @property
    def description(self) -> str:
        return (
            f"Usage correction of invoice {self.invoice_id}"
            f" ({self.period_start:%Y-%m-%d} to {self.period_end:%Y-%m-%d})"
        )

    @property
    def metadata(self) -> dict[str, str]:
        return {"tally_correction": self.id, "tally_invoice": self.invoice_id}


async def push(pool: AsyncConnectionPool, api: stripe.StripeClient, batch: int = 100) -> int:
    """Send the corrections Stripe has not been told of; returns how many were sent.
    One that Stripe refuses is logged and tried again on the next pass."""
    sent = 0
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        cur = await conn.execute(_WAITING, (batch,))
        for row in await cur.fetchall():
            waiting = Waiting(*row)
            try:
                made = await _send(conn, api, waiting)
            except stripe.StripeError as exc:
                log.warning("stripe refused a correction", correction=waiting.id, error=str(exc))
                continue
            await conn.execute(
                "UPDATE invoice_corrections SET stripe_id = %s WHERE id = %s", (made, waiting.id)
            )
            sent += 1
    return sent


async def _send(conn: AsyncConnection, api: stripe.StripeClient, waiting: Waiting) -> str:
    owed = Owed(
        f"tally-correction-{waiting.id}",
        waiting.customer,
        waiting.amount,
        waiting.currency,
        waiting.period_start,
        waiting.period_end,
        waiting.stripe_invoice if waiting.kind == "credit_note" else None,
        waiting.description,
        waiting.metadata,
    )
    return await money.tell(conn, api, owed)
