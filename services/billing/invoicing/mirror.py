"""Invoices copied into ClickHouse, so analytics SQL can sum revenue (``invoice_lines``).

PostgreSQL stays the truth; ClickHouse holds a copy per invoice, versioned by its
``computed_at``, that a newer copy replaces whole.  The billing run copies each batch's
invoices for the period after the batch commits: *all* of them, not only those it
changed, so a copy a failed write left behind is made good by the next run, and a
failure here never fails billing (it is logged).  Invoices changed outside a run (a
void) reach the copy when a run next covers their period.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from psycopg import AsyncConnection

from services.common.clickhouse import ClickHouse, ClickHouseError
from services.common.logging import get_logger

log = get_logger("tally.billing")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
COLUMNS = (
    "customer", "id", "period", "period_start", "period_end", "status", "currency", "total",
    "line_kind", "line_plan", "line_meter", "line_description", "line_start", "line_end",
    "line_quantity", "line_billable", "line_amount", "version",
)  # fmt: skip
_READ = (
    "SELECT id, customer_id, period, period_start, period_end, status, currency, total,"
    " lines, computed_at FROM invoices WHERE period = %s AND customer_id = ANY(%s)"
)


class InvoiceMirror:
    def __init__(self, clickhouse: Callable[[], ClickHouse]) -> None:
        self._clickhouse = clickhouse

    async def copy(self, conn: AsyncConnection, period: str, customers: Sequence[str]) -> int:
        """Copy ``customers``' invoices of ``period``; how many (0 when ClickHouse
        refused: the next run copies them again)."""
        cur = await conn.execute(_READ, (period, list(customers)))
        rows = [encode(row) for row in await cur.fetchall()]
        if not rows:
            return 0
        client = self._clickhouse()
        try:
            await asyncio.to_thread(
                client.insert, f"{client.database}.invoices", COLUMNS, orjson.dumps(rows)
            )
        except ClickHouseError as exc:
            log.warning("invoices not copied to ClickHouse", period=period, error=str(exc))
            return 0
        return len(rows)


def encode(row: Sequence[Any]) -> dict[str, Any]:
    """An ``invoices`` row as the ClickHouse row: lines as parallel arrays, decimals as
    text (never a float)."""
    invoice, customer, period, start, end, status, currency, total, lines, computed = row
    return {
        "customer": customer,
        "id": invoice,
        "period": period,
        "period_start": start,
        "period_end": end,
        "status": status,
        "currency": currency,
        "total": format(total, "f"),
        "line_kind": [line["kind"] for line in lines],
        "line_plan": [line["plan"] for line in lines],
        "line_meter": [line.get("meter") or "" for line in lines],
        "line_description": [line["description"] for line in lines],
        "line_start": [line["start"] for line in lines],
        "line_end": [line["end"] for line in lines],
        "line_quantity": [str(line["quantity"]) for line in lines],
        "line_billable": [str(line["billable"]) for line in lines],
        "line_amount": [str(line["amount"]) for line in lines],
        "version": _micros(computed),
    }


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)
