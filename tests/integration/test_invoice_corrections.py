"""Finalized invoices corrected after the fact, to the cent: more usage becomes a
correction line on the next invoice naming the corrected invoice and its period, less
becomes a credit note; nothing is booked twice, and the finalized invoice never changes."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool

from schemas.invoices import CreditNote, Invoice, InvoiceStatus, LineKind
from services.billing.invoicing import corrections, reader
from services.billing.invoicing.run import BillingRun
from services.billing.stripe import corrections as stripe_corrections
from tests.billing_support import amounts, at, record_usage, subscribe

D = Decimal


def no_clickhouse():  # the default catalog prices no distinct-count meter
    raise AssertionError("rating again should not need ClickHouse here")


async def _invoices(pool: AsyncConnectionPool, customer: str) -> dict[str, Invoice]:
    async with pool.connection() as conn:
        return {i.period: i for i in await reader.listed(conn, customer)}


async def _credit_notes(pool: AsyncConnectionPool, customer: str) -> list[CreditNote]:
    async with pool.connection() as conn:
        return await corrections.credit_notes(conn, customer, 10)


async def _booked(pool: AsyncConnectionPool, customer: str) -> list[tuple[str, Decimal]]:
    """The customer's corrections booked so far (other tests' invoices are corrected by
    the same passes: the database is shared)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT kind, amount FROM invoice_corrections WHERE customer_id = %s"
            " ORDER BY created_at, id",
            (customer,),
        )
        return [(kind, amount) for kind, amount in await cur.fetchall()]


async def test_more_usage_is_charged_next_time_less_is_credited(pool, tenant) -> None:
    customer = f"{tenant}-late"
    await subscribe(pool, customer, "starter", at("2025-06-15"))
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 60_000)
    run = BillingRun(pool, no_clickhouse, timedelta(hours=24))
    await run.run(date(2025, 7, 1), now=at("2025-08-03"), finalize=True)
    july = (await _invoices(pool, customer))["2025-07"]
    assert (july.status, july.total) == (InvoiceStatus.FINALIZED, D("59.00"))  # 49 + 10,000 x .001
    await run.correct_finalized()
    assert await _booked(pool, customer) == []  # nothing changed since

    await run.run(date(2025, 8, 1), now=at("2025-09-01T06:00"))  # August: a draft in grace
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 62_500)  # corrected up
    await run.correct_finalized()
    await run.correct_finalized()
    assert await _booked(pool, customer) == [("charge", D("2.50"))]  # booked once
    assert (await _invoices(pool, customer))["2025-07"] == july  # never changed
    async with pool.connection() as conn:  # the upcoming invoice shows it too
        upcoming = await reader.upcoming(conn, no_clickhouse, customer, at("2025-08-20"))
    assert upcoming is not None
    assert upcoming.invoice.lines[-1].corrects_invoice_id == july.id
    assert upcoming.forecast.lines[-1].amount == D("2.50")

    await run.run(date(2025, 8, 1), now=at("2025-09-01T06:00"))  # the draft carries it
    august = (await _invoices(pool, customer))["2025-08"]
    assert august.status is InvoiceStatus.DRAFT
    assert amounts(august) == [
        ("starter", D("49.00")),
        ("api_calls", D("0.00")),
        ("api_calls", D("2.50")),
    ]
    carried = august.lines[-1]
    assert carried.kind is LineKind.CORRECTION and carried.corrects_invoice_id == july.id
    assert (carried.start, carried.end) == (july.period_start, july.period_end)
    assert (carried.quantity, carried.billable) == (D(2500), D(2500))
    assert august.total == D("51.50")

    await run.run(
        date(2025, 8, 1), now=at("2025-09-03"), finalize=True
    )  # finalized: the charge is billed
    assert (await _invoices(pool, customer))["2025-08"].status is InvoiceStatus.FINALIZED
    await run.run(date(2025, 9, 1), now=at("2025-10-03"), finalize=True)
    september = (await _invoices(pool, customer))["2025-09"]
    assert september.total == D("49.00")  # billed once, on August's invoice

    # Corrected down: 62,500 billed (10.00 + 2.50); 52,000 rates at 2.00: 10.50 back.
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 52_000)
    await run.correct_finalized()
    [note] = await _credit_notes(pool, customer)
    assert (note.invoice_id, note.amount, note.currency) == (july.id, D("10.50"), "usd")
    assert [(line.quantity, line.amount) for line in note.lines] == [(D(-10_500), D("-10.50"))]
    # Below the included units: the last 2.00 back, and no further.
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 40_000)
    await record_usage(pool, customer, "api_calls", date(2025, 7, 5), 1)
    await run.correct_finalized()
    assert [n.amount for n in await _credit_notes(pool, customer)] == [D("2.00"), D("10.50")]
    await run.run(date(2025, 10, 1), now=at("2025-11-03"))
    assert (await _invoices(pool, customer))["2025-10"].total == D("49.00")  # credits are notes


async def test_graduated_tiers_are_corrected_by_the_difference_of_rounded_lines(
    pool, tenant
) -> None:
    customer = f"{tenant}-payg"
    await subscribe(pool, customer, "payg", at("2025-01-10"))
    await record_usage(pool, customer, "api_calls", date(2025, 3, 3), 4_000_000)
    await record_usage(pool, customer, "api_calls", date(2025, 3, 4), 6_000_000)
    run = BillingRun(pool, no_clickhouse, timedelta(hours=24))
    await run.run(date(2025, 3, 1), now=at("2025-04-03"), finalize=True)
    march = (await _invoices(pool, customer))["2025-03"]
    assert amounts(march)[0] == ("api_calls", D("2340.00"))
    # 3,333 more calls in the last tier at .0002: 0.6666 → 0.67
    await record_usage(pool, customer, "api_calls", date(2025, 3, 4), 6_003_333)
    await run.correct_finalized()
    await run.run(date(2025, 4, 1), now=at("2025-05-03"))
    april = (await _invoices(pool, customer))["2025-04"]
    [line] = [line for line in april.lines if line.kind is LineKind.CORRECTION]
    assert (line.quantity, line.amount, line.corrects_invoice_id) == (D(3333), D("0.67"), march.id)


async def test_stripe_gets_an_invoice_item_for_more_and_a_credit_note_for_less(
    pool, tenant, fake_stripe
) -> None:
    customer = f"{tenant}-stripe"
    await subscribe(pool, customer, "starter", at("2025-06-15"))
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 60_000)
    run = BillingRun(pool, no_clickhouse, timedelta(hours=24))
    await run.run(date(2025, 7, 1), now=at("2025-08-03"), finalize=True)
    july = (await _invoices(pool, customer))["2025-07"]
    api = fake_stripe.client()

    def mine(objects: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return [o for o in objects.values() if o["metadata"].get("tally_invoice") == july.id]

    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 62_500)
    await run.correct_finalized()
    await stripe_corrections.push(pool, api)
    await stripe_corrections.push(pool, api)  # told once
    [item] = mine(fake_stripe.invoice_items)
    assert (item["amount"], item["currency"]) == (250, "usd")
    assert item["period"] == {
        "start": int(july.period_start.timestamp()),
        "end": int(july.period_end.timestamp()),
    }
    stripe_customer = fake_stripe.customers[item["customer"]]
    assert stripe_customer["metadata"]["tally_customer"] == customer

    # Stripe billed July (6,250 cents, paid): its webhook named that invoice.
    paid = fake_stripe.add_invoice(item["customer"], 6_250)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE invoices SET stripe_invoice_id = %s WHERE id = %s", (paid, july.id)
        )
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 52_000)
    await run.correct_finalized()
    await stripe_corrections.push(pool, api)
    [note] = mine(fake_stripe.credit_notes)
    assert (note["invoice"], note["amount"], note["type"]) == (paid, 1_050, "post_payment")
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT kind, amount, stripe_id FROM invoice_corrections WHERE invoice_id = %s"
            " ORDER BY created_at",
            (july.id,),
        )
        assert await cur.fetchall() == [
            ("charge", D("2.50"), item["id"]),
            ("credit_note", D("-10.50"), note["id"]),
        ]

    # More credit than the Stripe invoice has left: Stripe refuses, it stays untold.
    fake_stripe.invoices[paid]["post_payment_credit_notes_amount"] = 6_200
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 50_500)
    await run.correct_finalized()
    await stripe_corrections.push(pool, api)
    assert len(mine(fake_stripe.credit_notes)) == 1
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM invoice_corrections WHERE invoice_id = %s AND stripe_id IS NULL",
            (july.id,),
        )
        assert await cur.fetchone() == (1,)
