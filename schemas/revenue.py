"""The seller's revenue view (``GET /v1/admin/revenue``), as the JSON API and the
dashboard show it.

Money is a decimal string in the currency named beside it: every amount sits in a block
that carries its ``currency``, and amounts in two currencies are never added up.  The
definitions of every figure are in ``docs/dashboards.md`` (## Revenue dashboard).
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

MAX_MONTHS = 36
TOP = 10


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class CurrencyMrr(_Frozen):
    currency: str
    mrr: Decimal = Field(description="Committed MRR now: recurring plan fees a month.")
    arr: Decimal = Field(description="MRR x 12.")
    paying_customers: int = Field(description="Customers whose MRR is above zero now.")
    arpu: Decimal = Field(description="MRR / paying customers, rounded half up.")


class MrrMonth(_Frozen):
    month: str = Field(description="YYYY-MM (UTC).")
    to_date: bool = Field(description="The current month: it ends later.")
    starting: Decimal
    new: Decimal
    expansion: Decimal
    contraction: Decimal
    churn: Decimal
    reactivation: Decimal
    ending: Decimal
    new_customers: int
    churned_customers: int
    reactivated_customers: int


class CurrencyMovements(_Frozen):
    currency: str
    months: list[MrrMonth]


class UsageRevenueMonth(_Frozen):
    month: str = Field(description="YYYY-MM: the month of consumption (the invoice's period).")
    invoiced: Decimal = Field(description="Usage lines of finalized, paid and failed invoices.")
    by_meter: dict[str, Decimal]
    invoices: int
    to_date: Decimal = Field(description="Usage lines of draft invoices (may still change).")


class CurrencyUsageRevenue(_Frozen):
    currency: str
    months: list[UsageRevenueMonth]


class PlanStatus(_Frozen):
    plan: str
    status: str
    customers: int


class TrialMonth(_Frozen):
    month: str
    started: int
    converted: int
    expired: int
    conversion_rate: Decimal | None = Field(description="Converted / ended; null: none ended.")


class Trials(_Frozen):
    running: int = Field(description="Customers in a trial now.")
    started: int
    converted: int
    expired: int
    conversion_rate: Decimal | None
    months: list[TrialMonth]


class CustomerQuantity(_Frozen):
    customer: str
    quantity: Decimal


class MeterUsage(_Frozen):
    meter: str
    unit: str
    aggregation: str
    total: Decimal = Field(description="The customers' month values added up.")
    customers: int = Field(description="Customers with usage this month.")
    top: list[CustomerQuantity]


class UsageThisMonth(_Frozen):
    month: str
    meters: list[MeterUsage]


class CustomerAmount(_Frozen):
    customer: str
    amount: Decimal


class CurrencyTop(_Frozen):
    currency: str
    customers: list[CustomerAmount]


class TopByRevenue(_Frozen):
    since: str = Field(description="YYYY-MM: invoices of periods from this month on count.")
    currencies: list[CurrencyTop]


class PastDueBalance(_Frozen):
    currency: str
    balance: Decimal = Field(description="Totals of invoices whose payment failed.")
    invoices: int
    customers: int


class PastDue(_Frozen):
    customers_past_due: int = Field(description="Customers whose status is past_due now.")
    balances: list[PastDueBalance]


class Revenue(_Frozen):
    as_of: AwareDatetime
    months: list[str] = Field(description="The months shown, oldest first.")
    customers: int
    mrr: list[CurrencyMrr]
    movements: list[CurrencyMovements]
    usage_revenue: list[CurrencyUsageRevenue]
    customers_by_plan: list[PlanStatus]
    trials: Trials
    usage_this_month: UsageThisMonth
    top_by_revenue: TopByRevenue
    past_due: PastDue
