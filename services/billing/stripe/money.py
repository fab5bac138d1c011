"""Money owed either way on a period Stripe has billed, told to Stripe as Stripe says to.

Stripe never reopens an invoice it has finalized.  Money owed to the seller goes as a
pending invoice item on the customer, for the period it is about, which Stripe's next
invoice bills; money owed back goes as a credit note (a ``custom_line_item``) on Stripe's
invoice of the period when Tally knows it (``invoices.stripe_invoice_id``, from Stripe's
webhooks), else as a negative invoice item: a credit on the next invoice.  Each create
carries an idempotency key of Tally's, so a crash before its id is recorded gets the
same object back on the next pass, never a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import stripe
from psycopg import AsyncConnection

from services.billing.rating.money import minor_units
from services.billing.stripe import client as stripe_client


@dataclass(frozen=True, slots=True)
class Owed:
    """``amount`` (signed: negative is owed back) for a customer's period."""

    key: str  # the idempotency key
    customer: str
    amount: Decimal
    currency: str
    period_start: datetime
    period_end: datetime
    stripe_invoice: str | None
    description: str
    metadata: dict[str, str]


async def tell(conn: AsyncConnection, api: stripe.StripeClient, owed: Owed) -> str:
    """Create the invoice item or credit note for ``owed``; its Stripe id."""
    cents = minor_units(owed.amount, owed.currency)
    if cents < 0 and owed.stripe_invoice:
        params: Any = {
            "invoice": owed.stripe_invoice,
            "lines": [
                {
                    "type": "custom_line_item",
                    "description": owed.description,
                    "quantity": 1,
                    "unit_amount": -cents,
                }
            ],
            "memo": owed.description,
            "metadata": owed.metadata,
        }
        made = await stripe_client.call(
            api.v1.credit_notes.create, params, idempotency_key=owed.key
        )
        return str(made.id)
    params = {
        "customer": await stripe_client.ensure_customer(conn, api, owed.customer),
        "amount": cents,
        "currency": owed.currency,
        "description": owed.description,
        "period": {
            "start": int(owed.period_start.timestamp()),
            "end": int(owed.period_end.timestamp()),
        },
        "metadata": owed.metadata,
    }
    item = await stripe_client.call(api.v1.invoice_items.create, params, idempotency_key=owed.key)
    return str(item.id)
