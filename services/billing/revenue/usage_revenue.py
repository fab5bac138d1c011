"""Usage revenue by month of consumption, read from the invoices' usage lines.

The month of consumption is the invoice's ``period`` (the month its billing period
starts in: for a monthly plan, the month the usage happened; a yearly plan's usage lands
in its period's first month).  Invoices that are ``finalized``, ``paid`` or
``payment_failed`` count as invoiced; ``draft`` ones are the month "to date", shown
apart because late usage may still change them; ``void`` ones count nowhere.  Sums are
PostgreSQL ``numeric`` sums of the lines' rounded amounts: what the invoices say, to
the cent.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from psycopg import AsyncConnection

from schemas.invoices import InvoiceStatus, LineKind
from schemas.revenue import CurrencyUsageRevenue, UsageRevenueMonth

INVOICED = [
    s.value for s in (InvoiceStatus.FINALIZED, InvoiceStatus.PAID, InvoiceStatus.PAYMENT_FAILED)
]

_USAGE = """
    SELECT i.period, i.currency, i.status = 'draft', l->>'meter',
           sum((l->>'amount')::numeric)
    FROM invoices i CROSS JOIN LATERAL jsonb_array_elements(i.lines) AS l
    WHERE l->>'kind' = %s AND i.period = ANY(%s) AND i.status = ANY(%s)
    GROUP BY 1, 2, 3, 4
"""
_INVOICES = """
    SELECT period, currency, count(*) FROM invoices
    WHERE period = ANY(%s) AND status = ANY(%s)
      AND jsonb_path_exists(lines, '$[*] ? (@.kind == "usage")')
    GROUP BY 1, 2
"""


async def by_month(conn: AsyncConnection, months: list[str]) -> list[CurrencyUsageRevenue]:
    """Each currency's usage revenue in each of ``months`` (YYYY-MM), oldest first."""
    statuses = [*INVOICED, InvoiceStatus.DRAFT.value]
    cur = await conn.execute(_USAGE, (LineKind.USAGE.value, months, statuses))
    found: dict[str, dict[str, _Month]] = defaultdict(lambda: {m: _Month() for m in months})
    for period, currency, draft, meter, amount in await cur.fetchall():
        month = found[currency][period]
        if draft:
            month.to_date += amount
        else:
            month.by_meter[meter] += amount
    cur = await conn.execute(_INVOICES, (months, INVOICED))
    for period, currency, count in await cur.fetchall():
        found[currency][period].invoices = count
    return [
        CurrencyUsageRevenue(
            currency=currency,
            months=[found[currency][m].model(m) for m in months],
        )
        for currency in sorted(found)
    ]


class _Month:
    def __init__(self) -> None:
        self.by_meter: dict[str, Decimal] = defaultdict(Decimal)
        self.invoices = 0
        self.to_date = Decimal(0)

    def model(self, month: str) -> UsageRevenueMonth:
        return UsageRevenueMonth(
            month=month,
            invoiced=sum(self.by_meter.values(), Decimal(0)),
            by_meter=dict(sorted(self.by_meter.items())),
            invoices=self.invoices,
            to_date=self.to_date,
        )
