"""Usage Stripe was never sent, settled as money once Tally's invoice of the period is final.

The outbox sends each day's usage as meter events, and Stripe bills the period from them.
What it could not send — a day lowered after its events were 24 hours old, usage older
than Stripe's 35 days: the outbox's ``adjustment`` rows — made Stripe's invoice bill
another quantity than Tally's.  Once Tally's invoice is final, each of its usage lines is
rated again at the quantity Stripe had (Tally's less the unsent units), and the
difference of money goes to Stripe, as corrections of finalized invoices do
(``corrections``): more as an invoice item for the period, less as a credit note on
Stripe's invoice of it when Tally knows it, else a negative invoice item.  Once per
invoice (``stripe_unsent``), and only rows queued before the invoice was final: later
ones are corrections of the finalized invoice, settled by those.

Lines of a period that does not start and end at UTC midnight (a customer billed in
another time zone) are left out: Stripe's daily events do not split at its hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import stripe
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from schemas.invoices import InvoiceLine, LineKind
from services.billing.invoicing.compose import LINES
from services.billing.invoicing.subscriptions import PlanBook, plan_book
from services.billing.rating import engine as rating
from services.billing.stripe import money
from services.billing.stripe.money import Owed
from services.common.logging import get_logger

log = get_logger("tally.stripe")

_FINAL = """
    SELECT i.id, i.customer_id, i.period_start, i.period_end, i.currency, i.lines,
           i.finalized_at, i.stripe_invoice_id
    FROM invoices i
    WHERE i.status IN ('finalized', 'paid', 'payment_failed')
      AND NOT EXISTS (SELECT 1 FROM stripe_unsent s WHERE s.invoice_id = i.id)
      AND EXISTS (SELECT 1 FROM stripe_objects o
                  WHERE o.kind = 'customer' AND o.key = i.customer_id)
    ORDER BY i.finalized_at
    LIMIT %s
"""
_UNSENT = """
    SELECT coalesce(sum(quantity), 0) FROM stripe_outbox
    WHERE customer_id = %s AND meter = %s AND state = 'adjustment'
      AND day >= %s AND day < %s AND queued_at <= %s
"""


@dataclass(frozen=True, slots=True)
class Finalized:
    id: str
    customer: str
    period_start: datetime
    period_end: datetime
    currency: str
    lines: tuple[InvoiceLine, ...]
    finalized_at: datetime
    stripe_invoice: str | None


async def settle(pool: AsyncConnectionPool, api: stripe.StripeClient, batch: int = 100) -> int:
    """Settle the finalized invoices not settled yet; returns how many needed money."""
    moved = 0
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        cur = await conn.execute(_FINAL, (batch,))
        finals = [_final(row) for row in await cur.fetchall()]
        book = await plan_book(conn) if finals else None
        for final in finals:
            assert book is not None
            amount = await _difference(conn, book, final)
            try:
                made = await _send(conn, api, final, amount) if amount else None
            except stripe.StripeError as exc:
                log.warning(
                    "stripe refused an unsent-usage settlement", invoice=final.id, error=str(exc)
                )
                continue
            await conn.execute(
                "INSERT INTO stripe_unsent (invoice_id, amount, stripe_id) VALUES (%s, %s, %s)",
                (final.id, amount, made),
            )
            moved += 1 if amount else 0
    return moved


def _final(row: Any) -> Finalized:
    ident, customer, start, end, currency, lines, finalized_at, stripe_invoice = row
    return Finalized(
        ident, customer, start, end, currency, LINES.validate_python(lines), finalized_at,
        stripe_invoice,
    )  # fmt: skip


async def _difference(conn: AsyncConnection, book: PlanBook, final: Finalized) -> Decimal:
    """Tally's usage lines less what they rate at with Stripe's quantity (rounded lines)."""
    total = Decimal(0)
    for line in final.lines:
        if line.kind is not LineKind.USAGE or line.meter is None or not _whole_days(line):
            continue
        cur = await conn.execute(
            _UNSENT,
            (final.customer, line.meter, line.start.date(), line.end.date(), final.finalized_at),
        )
        row = await cur.fetchone()
        unsent = Decimal(row[0]) if row else Decimal(0)
        if not unsent:
            continue
        plan = book.at(line.plan, line.end)
        billed = rating.usage_line(
            plan, line.meter, max(line.quantity - unsent, Decimal(0)), line.start, line.end
        )
        total += line.amount - billed.amount
    return total


def _whole_days(line: InvoiceLine) -> bool:
    return all(m.astimezone(UTC).time() == time() for m in (line.start, line.end))


async def _send(
    conn: AsyncConnection, api: stripe.StripeClient, final: Finalized, amount: Decimal
) -> str:
    description = (
        f"Usage of invoice {final.id} ({final.period_start:%Y-%m-%d} to"
        f" {final.period_end:%Y-%m-%d}) Stripe was not sent"
    )
    owed = Owed(
        f"tally-unsent-{final.id}",
        final.customer,
        amount,
        final.currency,
        final.period_start,
        final.period_end,
        final.stripe_invoice,
        description,
        {"tally_invoice": final.id, "tally_unsent": "true"},
    )
    return await money.tell(conn, api, owed)
