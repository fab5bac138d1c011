"""Invoices as the API shows them and PostgreSQL stores them (``invoices.lines``).

Every amount is a decimal in the invoice's currency.  A line's ``amount`` is rounded
once, to the currency's minor unit, half up; ``subtotal`` and ``total`` are sums of
rounded lines, so they always add up on paper.  ``tranches`` keep the unrounded
arithmetic that led to a usage line, tier by tier, so a customer can check it.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class InvoiceStatus(StrEnum):
    DRAFT = "draft"  # the period is closed; late usage may still change it
    FINALIZED = "finalized"  # frozen: never recomputed
    PAID = "paid"
    PAYMENT_FAILED = "payment_failed"
    VOID = "void"


class LineKind(StrEnum):
    FEE = "fee"  # the plan's recurring price, prorated by time
    USAGE = "usage"  # a meter's usage over (part of) the period
    CORRECTION = "correction"  # a change to a finalized invoice's usage line, billed later


class Tranche(BaseModel):
    """The units of a usage line priced at one rate (one tier, or the only rate)."""

    model_config = ConfigDict(frozen=True)

    quantity: Decimal
    unit_price: Decimal
    flat_price: Decimal = Decimal(0)
    amount: Decimal = Field(description="quantity * unit_price + flat_price, unrounded.")


class InvoiceLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: LineKind
    plan: str
    meter: str | None = None
    description: str
    start: AwareDatetime
    end: AwareDatetime
    quantity: Decimal = Field(description="Usage over the stretch, or the fee's share (0-1).")
    billable: Decimal = Field(description="What is charged for: quantity less included units.")
    amount: Decimal = Field(description="Rounded once to the currency's minor unit, half up.")
    tranches: tuple[Tranche, ...] = ()
    corrects_invoice_id: str | None = Field(
        None,
        description="A correction line: the finalized invoice it corrects; `start` and `end`"
        " are that invoice's stretch, `quantity` the change of usage, `amount` of money.",
    )


class Invoice(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str | None = Field(None, description="None for an upcoming invoice.")
    customer: str
    period: str = Field(description="YYYY-MM: the month the period starts in.")
    period_start: AwareDatetime
    period_end: AwareDatetime
    status: InvoiceStatus | None = None
    currency: str
    lines: tuple[InvoiceLine, ...]
    subtotal: Decimal
    total: Decimal
    computed_at: datetime | None = None
    finalized_at: datetime | None = None


class Forecast(BaseModel):
    """The upcoming invoice forecast to the period's end at its usage's recent pace."""

    lines: tuple[InvoiceLine, ...]
    total: Decimal
    method: str = Field(description="How the usage was forecast, in words.")


class UpcomingInvoice(BaseModel):
    invoice: Invoice = Field(description="The current period's invoice so far.")
    forecast: Forecast
    as_of: AwareDatetime


class CreditNote(BaseModel):
    """Money given back on a finalized invoice whose usage was corrected downwards."""

    id: str
    invoice_id: str = Field(description="The finalized invoice it credits.")
    customer: str
    period_start: AwareDatetime
    period_end: AwareDatetime
    currency: str
    amount: Decimal = Field(description="What is credited: positive, the sum of the lines.")
    lines: tuple[InvoiceLine, ...] = Field(
        description="Correction lines: each usage line's change, in negative amounts."
    )
    created_at: AwareDatetime


class CreditNoteList(BaseModel):
    credit_notes: list[CreditNote]


class InvoiceList(BaseModel):
    """``GET /v1/customers/{c}/invoices``: billing answers it, the customer dashboard
    (api service) reads it."""

    invoices: list[Invoice]
