"""Finalized invoices corrected after the fact: a charge on the next invoice, or a
credit note.

A finalized invoice never changes.  When the usage of its period changes afterwards — a
usage correction (``POST /v1/customers/{c}/usage/corrections``) or an event arriving
late — the rollups of its days are rewritten, and :func:`correct_finalized` rates the
period again (delta rating, as OpenMeter's engine does): each usage line's difference
between what it rates at now and what was billed for it (the invoice's line and the
corrections made to it before) becomes a correction line naming the corrected invoice
and its stretch.  Their sum, in rounded line amounts so that cents add up, is

- more money: a ``charge`` that the customer's next invoice carries
  (``drafts.Drafter`` puts it on every draft of a later period, the upcoming one too);
- less: a ``credit_note`` against the corrected invoice.

Only usage is rated again: a fee follows the subscription history, which the past does
not get.  Rows are written with the rollup watermark the period was rated at, in one
transaction: a crash rates it again, and never books a difference twice.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from schemas.invoices import CreditNote, InvoiceLine, LineKind
from services.billing.invoicing import subscriptions
from services.billing.invoicing.compose import LINES
from services.billing.invoicing.drafts import Ask, Drafter
from services.billing.invoicing.periods import Period
from services.common import catalog
from services.common.clickhouse import ClickHouse

ZERO = Decimal(0)
CHARGE, CREDIT_NOTE = "charge", "credit_note"
Key = tuple[str, str | None, datetime, datetime]  # plan, meter, start, end

_CHANGED = """
    SELECT i.id, i.customer_id, i.period_start, i.period_end, i.currency, i.lines, w.latest
    FROM invoices i
    LEFT JOIN invoice_checks k ON k.invoice_id = i.id
    CROSS JOIN LATERAL (
        SELECT max(u.watermark) AS latest FROM usage_daily u
        WHERE u.customer = i.customer_id
          AND u.day >= (i.period_start AT TIME ZONE 'UTC')::date
          AND u.day <= ((i.period_end - interval '1 microsecond') AT TIME ZONE 'UTC')::date
    ) w
    WHERE i.status IN ('finalized', 'paid', 'payment_failed')
      AND w.latest > coalesce(k.checked_through, i.finalized_at)
    ORDER BY i.finalized_at
    LIMIT %s
"""


@dataclass(frozen=True, slots=True)
class Changed:
    """A finalized invoice whose period's rollups were rewritten since it was checked."""

    id: str
    customer: str
    period: Period
    currency: str
    lines: tuple[InvoiceLine, ...]
    rolled_through: datetime


async def correct_finalized(
    conn: AsyncConnection, clickhouse: Callable[[], ClickHouse], batch: int = 500
) -> int:
    """Rate again every finalized invoice whose period's usage changed; the corrections
    written (``conn`` in autocommit: each invoice is its own transaction)."""
    written = 0
    while changed := await _changed(conn, batch):
        meters = {m.name: m for m in await catalog.meters(conn)}
        drafter = Drafter(await subscriptions.plan_book(conn), meters, clickhouse)
        for invoice in changed:
            written += await _correct(conn, drafter, invoice)
        if len(changed) < batch:
            break
    return written


async def _changed(conn: AsyncConnection, batch: int) -> list[Changed]:
    cur = await conn.execute(_CHANGED, (batch,))
    return [
        Changed(
            row[0], row[1], Period(row[2], row[3]), row[4], LINES.validate_python(row[5]), row[6]
        )
        for row in await cur.fetchall()
    ]


async def _correct(conn: AsyncConnection, drafter: Drafter, invoice: Changed) -> int:
    subscription = await subscriptions.one(conn, invoice.customer)
    lines: list[InvoiceLine] = []
    if subscription is not None:
        [draft] = await drafter.draft(conn, [Ask(subscription, invoice.period, invoice.period.end)])
        billed = [*invoice.lines, *await _corrections_of(conn, invoice.id)]
        lines = differences(billed, draft.lines(), invoice.id)
    async with conn.transaction():
        amount = sum((line.amount for line in lines), ZERO)
        if amount:
            await _record(conn, invoice, lines, amount)
        await conn.execute(
            "INSERT INTO invoice_checks (invoice_id, checked_through) VALUES (%s, %s)"
            " ON CONFLICT (invoice_id) DO UPDATE SET checked_through = excluded.checked_through",
            (invoice.id, invoice.rolled_through),
        )
    return 1 if amount else 0


def differences(
    billed: Iterable[InvoiceLine], rated: Iterable[InvoiceLine], invoice_id: str
) -> list[InvoiceLine]:
    """Correction lines that take each billed usage line (with its earlier corrections)
    to the line rated now; none where the money is the same."""
    before: dict[Key, tuple[Decimal, Decimal, Decimal]] = defaultdict(lambda: (ZERO, ZERO, ZERO))
    for line in billed:
        if line.kind is not LineKind.FEE:
            quantity, billable, amount = before[_key(line)]
            before[_key(line)] = (
                quantity + line.quantity,
                billable + line.billable,
                amount + line.amount,
            )
    after = {_key(line): line for line in rated if line.kind is LineKind.USAGE}
    out = []
    for key in sorted(set(before) | set(after), key=lambda k: (k[2], k[1] or "", k[0])):
        was = before.get(key, (ZERO, ZERO, ZERO))
        now = after.get(key)
        quantity, billable, amount = (
            (now.quantity, now.billable, now.amount) if now else (ZERO, ZERO, ZERO)
        )
        if amount == was[2]:
            continue
        plan, meter, start, end = key
        out.append(
            InvoiceLine(
                kind=LineKind.CORRECTION,
                plan=plan,
                meter=meter,
                description=f"Correction of {invoice_id}: {meter} from {was[0]} to {quantity}"
                f" ({start:%Y-%m-%d} to {end:%Y-%m-%d})",
                start=start,
                end=end,
                quantity=quantity - was[0],
                billable=billable - was[1],
                amount=amount - was[2],
                corrects_invoice_id=invoice_id,
            )
        )
    return out


def _key(line: InvoiceLine) -> Key:
    return (line.plan, line.meter, line.start, line.end)


async def _corrections_of(conn: AsyncConnection, invoice_id: str) -> list[InvoiceLine]:
    cur = await conn.execute(
        "SELECT lines FROM invoice_corrections WHERE invoice_id = %s ORDER BY created_at",
        (invoice_id,),
    )
    return [line for (raw,) in await cur.fetchall() for line in LINES.validate_python(raw)]


async def _record(
    conn: AsyncConnection, invoice: Changed, lines: Sequence[InvoiceLine], amount: Decimal
) -> None:
    kind, prefix = (CHARGE, "ic_") if amount > 0 else (CREDIT_NOTE, "cn_")
    await conn.execute(
        "INSERT INTO invoice_corrections (id, invoice_id, customer_id, kind, period_start,"
        " period_end, currency, amount, lines) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            f"{prefix}{secrets.token_hex(10)}",
            invoice.id,
            invoice.customer,
            kind,
            invoice.period.start,
            invoice.period.end,
            invoice.currency,
            amount,
            Jsonb(LINES.dump_python(tuple(lines), mode="json")),
        ),
    )


async def mark_billed(conn: AsyncConnection, billed: Mapping[str, Sequence[str]]) -> None:
    """The charges (ids) that invoices just finalized (invoice id →) carried are billed."""
    await conn.cursor().executemany(
        "UPDATE invoice_corrections SET billed_on = %s WHERE id = ANY(%s) AND billed_on IS NULL",
        [(invoice, list(ids)) for invoice, ids in billed.items() if ids],
    )


async def credit_notes(conn: AsyncConnection, customer: str, limit: int) -> list[CreditNote]:
    """The customer's credit notes, newest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, invoice_id, customer_id AS customer, period_start, period_end,"
            " currency, -amount AS amount, lines, created_at FROM invoice_corrections"
            " WHERE customer_id = %s AND kind = 'credit_note'"
            " ORDER BY created_at DESC, id LIMIT %s",
            (customer, limit),
        )
        return [CreditNote.model_validate(row) for row in await cur.fetchall()]
