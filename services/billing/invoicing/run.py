"""The billing run: one invoice per customer for the periods that start in a month.

``tally billing run --period 2026-11`` (and the billing service, on a schedule) walks
the customers in id order, a batch at a time.  Each batch's invoices and the run's
cursor are written in one transaction, so a run that crashes resumes after the last
batch it committed, and rerunning a finished run is harmless:

- a period that has not ended yet is skipped (its invoice is the upcoming one);
- a draft whose lines changed — late usage, a corrected plan — is recomputed;
- a finalized (or paid, or void) invoice is never touched again.

A draft is finalized once the grace period after its end has passed and the rollups
hold every event stored by then, or at once with ``finalize=True``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.invoices import InvoiceStatus
from services.billing.invoicing import corrections, finalized, subscriptions
from services.billing.invoicing.compose import LINES
from services.billing.invoicing.drafts import Ask, Draft, Drafter
from services.billing.invoicing.mirror import InvoiceMirror
from services.billing.rollup import watermark as watermarks
from services.common import catalog
from services.common.clickhouse import ClickHouse
from services.common.logging import get_logger
from services.common.redis import UNREACHABLE

log = get_logger("tally.billing")
CORRECTIONS = "corrections"  # the advisory lock's name of the corrections pass

_UPSERT = (
    """
    INSERT INTO invoices (id, customer_id, period, period_start, period_end, status,
                          currency, lines, subtotal, total, finalized_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (customer_id, period_start) DO UPDATE SET
        lines = excluded.lines, subtotal = excluded.subtotal, total = excluded.total,
        currency = excluded.currency, period_end = excluded.period_end,
        status = excluded.status, finalized_at = excluded.finalized_at, computed_at = now()
    WHERE invoices.status = 'draft'
      AND (invoices.lines <> excluded.lines OR excluded.status <> 'draft')
"""
    + finalized.RETURNING
)


class RunInProgress(RuntimeError):
    """Another process is running the same period's billing run."""


@dataclass(frozen=True, slots=True)
class Report:
    period: str
    customers: int
    written: int  # invoices created, recomputed or finalized
    skipped: int  # customers without a closed period starting in the month
    resumed_after: str  # the cursor a crashed run left ('' = from the start)


class BillingRun:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        clickhouse: Callable[[], ClickHouse],
        grace: timedelta,
        batch: int = 5000,
        redis: Redis | None = None,
        mirror: InvoiceMirror | None = None,
    ) -> None:
        """``redis``: where finalized invoices are told (``invoice.finalized``); None
        tells nobody (the lifecycle scan still will).  ``mirror``: where each batch's
        invoices are copied for analytics SQL; None copies them nowhere."""
        self._mirror = mirror
        self._pool = pool
        self._redis = redis
        self._clickhouse = clickhouse
        self._grace = grace
        self._batch = batch

    async def run(self, month: date, now: datetime | None = None, finalize: bool = False) -> Report:
        now = now or datetime.now(UTC)
        label = f"{month:%Y-%m}"
        async with self._pool.connection() as conn:
            await conn.set_autocommit(True)
            if not await _lock(conn, label):
                raise RunInProgress(f"a billing run for {label} is already in progress")
            try:
                return await self._run(conn, month, now, finalize)
            finally:
                await _unlock(conn, label)

    async def correct_finalized(self) -> int:
        """Book what changed in finalized invoices' periods (``corrections``): charges
        the next runs carry, credit notes.  One pass at a time; 0 while another runs."""
        async with self._pool.connection() as conn:
            await conn.set_autocommit(True)
            if not await _lock(conn, CORRECTIONS):
                return 0
            try:
                return await corrections.correct_finalized(conn, self._clickhouse)
            finally:
                await _unlock(conn, CORRECTIONS)

    async def _run(
        self, conn: AsyncConnection, month: date, now: datetime, finalize: bool
    ) -> Report:
        label = f"{month:%Y-%m}"
        cursor = resumed = await _start(conn, label)
        meters = {m.name: m for m in await catalog.meters(conn)}
        drafter = Drafter(await subscriptions.plan_book(conn), meters, self._clickhouse)
        complete = await watermarks.read(self._pool)
        customers = written = skipped = 0
        while batch := await subscriptions.page(conn, cursor, self._batch):
            asks = [a for s in batch if (a := _ask(drafter, s, month, now))]
            drafts = await drafter.draft(conn, asks)
            async with conn.transaction():
                rows = await _write(conn, drafts, self._finalizes(now, complete, finalize))
                await _bill_carried(conn, drafts, rows)
                written += len(rows)
                cursor = batch[-1].customer
                await conn.execute(
                    "UPDATE billing_runs SET cursor = %s, invoices = invoices + %s"
                    " WHERE period = %s",
                    (cursor, len(drafts), label),
                )
            await self._tell([r for r in rows if r[6] is not None])
            if self._mirror is not None:
                await self._mirror.copy(conn, label, [s.customer for s in batch])
            customers += len(batch)
            skipped += len(batch) - len(asks)
            log.info("billing batch", period=label, cursor=cursor, invoices=len(drafts))
        await conn.execute(
            "UPDATE billing_runs SET finished_at = now() WHERE period = %s", (label,)
        )
        return Report(label, customers, written, skipped, resumed)

    async def _tell(self, finals: list[finalized.Row]) -> None:
        """After the batch's commit: a failure to publish loses nothing the lifecycle
        scan does not publish again, so it is logged, not raised."""
        if self._redis is None or not finals:
            return
        try:
            await finalized.tell(self._redis, finals)
        except UNREACHABLE as exc:
            log.warning("invoice.finalized not published", error=repr(exc))

    def _finalizes(
        self, now: datetime, complete: datetime | None, forced: bool
    ) -> Callable[[Draft], bool]:
        def finalizes(draft: Draft) -> bool:
            due = draft.ask.period.end + self._grace
            return forced or (now >= due and complete is not None and complete >= due)

        return finalizes


async def _bill_carried(
    conn: AsyncConnection, drafts: Sequence[Draft], rows: Sequence[finalized.Row]
) -> None:
    """The carried charges of the invoices just finalized are billed by them."""
    carried = {d.ask.subscription.customer: [c.id for c in d.carried] for d in drafts}
    finals = {row[0]: carried.get(row[1], []) for row in rows if row[6] is not None}
    await corrections.mark_billed(conn, finals)


def _ask(
    drafter: Drafter, subscription: subscriptions.Subscription, month: date, now: datetime
) -> Ask | None:
    """The customer's period starting in ``month``, if it has ended and they had one."""
    period = drafter.period_in(subscription, month)
    if period is None or period.end > now or subscription.states[0].at >= period.end:
        return None
    return Ask(subscription, period, period.end)


async def _write(
    conn: AsyncConnection, drafts: Sequence[Draft], finalizes: Callable[[Draft], bool]
) -> list[finalized.Row]:
    """The invoices written: created, recomputed or finalized (``finalized_at`` set)."""
    if not drafts:
        return []
    rows = []
    for draft in drafts:
        invoice = draft.invoice()
        final = finalizes(draft)
        rows.append(
            (
                f"inv_{secrets.token_hex(10)}",
                invoice.customer,
                invoice.period,
                invoice.period_start,
                invoice.period_end,
                InvoiceStatus.FINALIZED if final else InvoiceStatus.DRAFT,
                invoice.currency,
                Jsonb(LINES.dump_python(invoice.lines, mode="json")),
                invoice.subtotal,
                invoice.total,
                datetime.now(UTC) if final else None,
            )
        )
    written: list[finalized.Row] = []
    async with conn.cursor() as cur:
        await cur.executemany(_UPSERT, rows, returning=True)
        while True:
            written += [tuple(row) for row in await cur.fetchall()]
            if not cur.nextset():
                break
    return written


async def _start(conn: AsyncConnection, label: str) -> str:
    """The cursor to start from: where an unfinished run stopped, else the beginning."""
    await conn.execute(
        "INSERT INTO billing_runs (period) VALUES (%s) ON CONFLICT (period) DO UPDATE SET"
        " started_at = now(), finished_at = NULL, cursor = '', invoices = 0"
        " WHERE billing_runs.finished_at IS NOT NULL",
        (label,),
    )
    cur = await conn.execute("SELECT cursor FROM billing_runs WHERE period = %s", (label,))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _lock(conn: AsyncConnection, label: str) -> bool:
    cur = await conn.execute(
        "SELECT pg_try_advisory_lock(hashtext('tally.billing.' || %s))", (label,)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _unlock(conn: AsyncConnection, label: str) -> None:
    await conn.execute("SELECT pg_advisory_unlock(hashtext('tally.billing.' || %s))", (label,))
