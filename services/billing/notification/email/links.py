"""Where an email sends its reader: the customer's own resources under
``TALLY_PUBLIC_URL``, and the API reference for the calls that change something.

There is no dashboard yet, so a link is either a ``GET`` the customer can open with
their key (limits, usage, invoices, plans) or the ReDoc page of the ``POST`` that does
what the email suggests (Checkout to upgrade, the billing portal to pay, key rotation).
ReDoc anchors are ``#tag/<tag>/operation/<operationId>``, with FastAPI's operation ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

CHECKOUT = ("stripe", "checkout_v1_customers__customer__billing_checkout_post")
PORTAL = ("stripe", "portal_v1_customers__customer__billing_portal_post")
ROTATE_KEY = ("accounts", "rotate_v1_keys__key_id__rotate_post")


@dataclass(frozen=True, slots=True)
class Links:
    base: str  # TALLY_PUBLIC_URL, without a trailing slash
    customer: str

    def customer_path(self, tail: str) -> str:
        return f"{self.base}/v1/customers/{quote(self.customer, safe='')}{tail}"

    def reference(self, operation: tuple[str, str]) -> str:
        tag, operation_id = operation
        return f"{self.base}/redoc#tag/{tag}/operation/{operation_id}"

    @property
    def limits(self) -> str:
        return self.customer_path("/limits")

    def usage(self, meter: str, period: dict[str, Any] | None = None) -> str:
        query = {"meter": meter}
        if period:
            query |= {"from": str(period["start"]), "to": str(period["end"])}
        return self.customer_path("/usage?" + urlencode(query))

    @property
    def upcoming_invoice(self) -> str:
        return self.customer_path("/invoices/upcoming")

    @property
    def invoices(self) -> str:
        return self.customer_path("/invoices")

    @property
    def notifications(self) -> str:
        return self.customer_path("/notifications")

    @property
    def plans(self) -> str:
        return f"{self.base}/v1/plans"

    @property
    def keys(self) -> str:
        return f"{self.base}/v1/keys"

    @property
    def checkout(self) -> str:
        """How to upgrade: ``POST /v1/customers/{c}/billing/checkout {plan, ...}``."""
        return self.reference(CHECKOUT)

    @property
    def portal(self) -> str:
        """How to pay or change the card: ``POST /v1/customers/{c}/billing/portal``."""
        return self.reference(PORTAL)

    @property
    def rotate_key(self) -> str:
        return self.reference(ROTATE_KEY)
