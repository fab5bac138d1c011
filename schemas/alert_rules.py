"""A customer's alert rules as ``GET /v1/customers/{c}/alerts`` shows them.

Billing owns the rules and answers the route; the customer dashboard (api service) reads
the same answer over HTTP, so the models live here, where both meet.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

from schemas.alerts import AlertKind


class CompiledThreshold(BaseModel):
    value: Decimal = Field(description="As configured: 80 (%), 900 (units), 50.00 (money).")
    quantity: Decimal | None = Field(
        description="The period usage at which it fires; null: never on this plan, or a"
        " spend on the whole invoice (several meters' usage: no one level)."
    )


class AlertRule(BaseModel):
    id: str = Field(description="\"plan\" for the plan's defaults, else the rule's id.")
    source: Literal["plan", "customer"]
    meter: str | None = Field(description="null: a spend rule on the whole invoice to date.")
    kind: AlertKind
    thresholds: list[CompiledThreshold]
    limit: Decimal | None = Field(None, description="What a percentage refers to.")
    currency: str | None = None
    created_at: datetime | None = None


class AlertList(BaseModel):
    customer: str
    plan: str
    alerts: list[AlertRule]
