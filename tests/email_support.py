"""One notification of every type, with the payload each producer agreed to send
(/work/briefs/payloads.md), and the numbers its email must show."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.notifications import Notification, NotificationType, notification_id

T = NotificationType
CUSTOMER = "acme"
AT = datetime(2026, 12, 30, 23, 5, tzinfo=UTC)
PERIOD = {"start": "2026-12-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}

PAYLOADS: dict[NotificationType, dict[str, Any]] = {
    T.ALERT_TRIGGERED: {
        "meter": "api_calls",
        "period": PERIOD,
        "threshold": {"kind": "percent", "value": "80", "quantity": "800"},
        "usage": "812",
        "limit": "1000",
        "rule": "plan",
        "upgrade_to": "pro",
    },
    T.USAGE_FORECAST_OVERAGE: {
        "period": PERIOD,
        "meters": [
            {
                "meter": "api_calls",
                "usage": "96000",
                "forecast": "123500",
                "included": "100000",
                "quota": None,
            }
        ],
        "forecast_overage_amount": "23.50",
        "forecast_total": "72.5",
        "currency": "usd",
        "method": "the last 7 days' rate, over at least 24 hours",
    },
    T.TRIAL_ENDING: {"plan": "pro", "trial_ends_at": "2027-01-02T09:30:00Z"},
    T.QUOTA_EXHAUSTED: {"meter": "api_calls", "period": PERIOD, "limit": "1000"},
    T.INVOICE_FINALIZED: {
        "invoice_id": "inv_2026_12_acme",
        "period": PERIOD,
        "total": "1234.5",
        "currency": "eur",
    },
    T.PAYMENT_FAILED: {
        "invoice_id": "inv_2026_11_acme",
        "amount_due": "49",
        "currency": "usd",
        "status": "past_due",
    },
    T.PLAN_CHANGED: {"from_plan": "free", "to_plan": "pro", "source": "stripe"},
    T.API_KEY_EXPIRING: {"key_id": "key_7f3a", "expires_at": "2027-01-06T00:00:00Z"},
    T.WEBHOOK_TEST: {"endpoint_id": "we_1", "message": "Hello from Tally"},
}

EXPECTED: dict[NotificationType, tuple[str, list[str], str]] = {
    # type: (subject, numbers both bodies show, the link both bodies carry)
    T.ALERT_TRIGGERED: (
        "api_calls reached 80 % of its limit in December 2026",
        ["812", "1,000", "81 %", "800", "Friday 1 January 2027, 00:00 UTC", "pro"],
        "/v1/customers/acme/usage?meter=api_calls",
    ),
    T.USAGE_FORECAST_OVERAGE: (
        "Forecast for December 2026: $23.50 in overage",
        ["96,000", "123,500", "100,000", "$23.50", "$72.50", "the last 7 days"],
        "/v1/customers/acme/invoices/upcoming",
    ),
    T.TRIAL_ENDING: (
        "Your pro trial ends 2 January 2027",
        ["Saturday 2 January 2027, 09:30 UTC"],
        "/redoc#tag/stripe/operation/checkout_v1_customers__customer__billing_checkout_post",
    ),
    T.QUOTA_EXHAUSTED: (
        "Your api_calls quota is used up for December 2026",
        ["1,000", "429", "Friday 1 January 2027, 00:00 UTC"],
        "/v1/customers/acme/limits",
    ),
    T.INVOICE_FINALIZED: (
        "Your invoice for December 2026: 1,234.50 EUR",
        ["inv_2026_12_acme", "1,234.50 EUR"],
        "/v1/customers/acme/invoices",
    ),
    T.PAYMENT_FAILED: (
        "Payment failed: $49.00 is due",
        ["$49.00", "inv_2026_11_acme", "past due"],
        "/redoc#tag/stripe/operation/portal_v1_customers__customer__billing_portal_post",
    ),
    T.PLAN_CHANGED: (
        "Your plan changed from free to pro",
        ["through your Stripe subscription", "Wednesday 30 December 2026, 23:05 UTC"],
        "/v1/customers/acme/limits",
    ),
    T.API_KEY_EXPIRING: (
        "Your API key key_7f3a expires 6 January 2027",
        ["Wednesday 6 January 2027, 00:00 UTC", "/v1/keys/key_7f3a/rotate"],
        "/redoc#tag/accounts/operation/rotate_v1_keys__key_id__rotate_post",
    ),
    T.WEBHOOK_TEST: (
        "Test notification from Tally",
        ["Hello from Tally", "we_1"],
        "/v1/customers/acme/notifications",
    ),
}


def sample(kind: NotificationType, customer: str = CUSTOMER, **data: Any) -> Notification:
    """The example ``kind`` notification for ``customer``, with ``data`` overriding."""
    payload = {"customer": customer} | PAYLOADS[kind] | data
    return Notification(
        id=notification_id(kind, customer, AT.isoformat()),
        type=kind,
        customer=customer,
        occurred_at=AT,
        data=payload,
    )
