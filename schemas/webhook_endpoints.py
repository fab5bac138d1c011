"""Webhook endpoints as billing's API lists them (never with their secret).

Billing owns the endpoints and answers the routes; the customer dashboard (api service)
reads the same list over HTTP, so the models live here, where both meet.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class EndpointOut(BaseModel):
    id: str
    customer: str | None  # None: a seller endpoint (every customer's notifications)
    url: str
    events: list[str] | None
    created_at: datetime
    disabled: bool
    disabled_reason: str | None
    previous_secret_until: datetime | None  # the rotated-out secret still signs until then


class EndpointList(BaseModel):
    endpoints: list[EndpointOut]
