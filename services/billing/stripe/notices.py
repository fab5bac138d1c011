"""What a Stripe webhook's decision tells the customer: ``payment.failed`` and
``plan.changed`` (built by the accounts service), collected while the event is applied
and published after its commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from schemas.notifications import Notification, NotificationType, notification_id
from services.billing.rating.money import exponent


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
            Notification(
                id=notification_id(kind, customer, self.event_id),
                type=kind,
                customer=customer,
                occurred_at=self.at,
                data={
                    "customer": customer,
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
