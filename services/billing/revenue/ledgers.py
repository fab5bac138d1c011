"""What the customers and invoices tables say, grouped: customers by plan and status,
the top customers by invoiced revenue, and the past-due balance.

Top customers by revenue: the totals (fees and usage) of their invoiced invoices —
``finalized``, ``paid``, ``payment_failed`` — for the periods of the trailing twelve
months, the current one included; per currency.  The past-due balance: the totals of
invoices in ``payment_failed`` (a payment failed and none has succeeded since), per
currency, whatever the customer's status; beside it, the customers whose status is
``past_due``.
"""

from __future__ import annotations

from collections import defaultdict

from psycopg import AsyncConnection

from schemas.invoices import InvoiceStatus
from schemas.revenue import (
    TOP,
    CurrencyTop,
    CustomerAmount,
    PastDue,
    PastDueBalance,
    PlanStatus,
)
from services.billing.revenue.usage_revenue import INVOICED

_TOP = """
    SELECT currency, customer_id, amount FROM (
        SELECT currency, customer_id, sum(total) AS amount,
               row_number() OVER (PARTITION BY currency ORDER BY sum(total) DESC, customer_id)
        FROM invoices WHERE period >= %s AND status = ANY(%s)
        GROUP BY currency, customer_id
    ) ranked WHERE row_number <= %s AND amount > 0
    ORDER BY currency, amount DESC, customer_id
"""


async def by_plan(conn: AsyncConnection) -> list[PlanStatus]:
    cur = await conn.execute(
        "SELECT plan_id, status, count(*) FROM customers GROUP BY 1, 2 ORDER BY 1, 2"
    )
    return [PlanStatus(plan=p, status=s, customers=n) for p, s, n in await cur.fetchall()]


async def top_by_revenue(conn: AsyncConnection, since: str) -> list[CurrencyTop]:
    """Each currency's ``TOP`` customers by invoiced totals of periods from ``since``."""
    cur = await conn.execute(_TOP, (since, INVOICED, TOP))
    found: dict[str, list[CustomerAmount]] = defaultdict(list)
    for currency, customer, amount in await cur.fetchall():
        found[currency].append(CustomerAmount(customer=customer, amount=amount))
    return [CurrencyTop(currency=c, customers=found[c]) for c in sorted(found)]


async def past_due(conn: AsyncConnection) -> PastDue:
    cur = await conn.execute(
        "SELECT currency, sum(total), count(*), count(DISTINCT customer_id) FROM invoices"
        " WHERE status = %s GROUP BY currency ORDER BY currency",
        (InvoiceStatus.PAYMENT_FAILED.value,),
    )
    balances = [
        PastDueBalance(currency=c, balance=b, invoices=n, customers=k)
        for c, b, n, k in await cur.fetchall()
    ]
    cur = await conn.execute("SELECT count(*) FROM customers WHERE status = 'past_due'")
    row = await cur.fetchone()
    return PastDue(customers_past_due=row[0] if row else 0, balances=balances)
