"""Notifications: what Tally tells a customer or the seller, as every service hands it over.

Any process that decides something worth telling (the aggregator's threshold crossings,
the enforcer's first refusal of a hard quota, billing's finalized invoice, a plan change)
builds a ``Notification`` with a *stable* id and publishes it to the Redis stream
``STREAM``.  Billing's notification package is the one owner of what happens next: it
stores each id once (a repeat of the same id is the same notification: replays, retries
and restarts never tell twice), fans it out to the customer's and the seller's webhook
endpoints and to the customer's email, and delivers with retries.

The id doubles as the Standard Webhooks ``webhook-id``, so a receiver de-duplicates by it.
"""

from __future__ import annotations

from base64 import b32encode
from datetime import UTC, datetime
from enum import StrEnum
from hashlib import blake2b
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict

STREAM = "tally:notifications"
"""Redis stream every producer appends to (field ``n``: the notification as JSON)."""
STREAM_MAXLEN = 1_000_000
"""Approximate cap on the stream; the notifier acknowledges and trims far below it."""


class NotificationType(StrEnum):
    ALERT_TRIGGERED = "alert.triggered"
    USAGE_FORECAST_OVERAGE = "usage.forecast_overage"
    TRIAL_ENDING = "trial.ending"
    QUOTA_EXHAUSTED = "quota.exhausted"
    INVOICE_FINALIZED = "invoice.finalized"
    PAYMENT_FAILED = "payment.failed"
    PLAN_CHANGED = "plan.changed"
    API_KEY_EXPIRING = "api_key.expiring"
    WEBHOOK_TEST = "webhook.test"


class Notification(BaseModel):
    """One thing to tell one customer; ``data`` is the payload's ``data`` object as sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    type: NotificationType
    customer: str
    occurred_at: AwareDatetime
    data: dict[str, Any]

    @classmethod
    def decided(
        cls,
        kind: NotificationType,
        customer: str,
        what: tuple[object, ...],
        at: datetime,
        data: dict[str, Any],
    ) -> Notification:
        """The notification of one decision: its stable id from ``what`` decided it (e.g.
        meter, period start, threshold), and ``customer`` first in ``data`` as every
        payload carries it."""
        return cls(
            id=notification_id(kind, customer, *what),
            type=kind,
            customer=customer,
            occurred_at=at,
            data={"customer": customer, **data},
        )


def moment(instant: datetime) -> str:
    """An instant as ids and payloads carry it: RFC 3339 UTC (``2026-11-01T00:00:00Z``), so
    every producer derives the same id from the same instant whatever its time zone."""
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def notification_id(kind: NotificationType, customer: str, *what: object) -> str:
    """The stable id of a notification: the same decision always yields the same id
    (e.g. ``(ALERT_TRIGGERED, cust, meter, period, threshold)``)."""
    parts = "\x00".join([kind.value, customer, *(str(p) for p in what)])
    digest = blake2b(parts.encode(), digest_size=15).digest()
    return "msg_" + b32encode(digest).decode().lower()


def plan_changed(
    customer: str, before: str, after: str, source: str, change: str, at: datetime
) -> Notification | None:
    """``plan.changed`` for a change from ``before`` to ``after`` made by ``source``
    (admin, stripe, trial_end); ``change`` is its own id (a Stripe event id, ``trial_end``,
    or the change's time as ``moment`` writes it).  None when the plan stayed the same.

    Here, where both meet: the api tells a change at once, billing's lifecycle pass
    re-tells it from ``subscription_history`` under the same id."""
    if before == after:
        return None
    kind = NotificationType.PLAN_CHANGED
    return Notification.decided(
        kind, customer, (change,), at, {"from_plan": before, "to_plan": after, "source": source}
    )
