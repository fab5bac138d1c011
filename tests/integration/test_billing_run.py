"""The billing run against real PostgreSQL: amounts to the cent, proration, trials,
idempotency, finalization, crash and resume, one run at a time."""

from __future__ import annotations

import asyncio
from datetime import date, timedelta
from decimal import Decimal

import pytest
from psycopg_pool import AsyncConnectionPool

from schemas.invoices import InvoiceStatus
from services.billing.invoicing import run as run_module
from services.billing.invoicing.run import BillingRun, RunInProgress
from services.billing.rollup import watermark as watermarks
from tests.billing_support import amounts, at, change, invoice_of, record_usage, subscribe

D = Decimal


def no_clickhouse():  # the default catalog prices no distinct-count meter
    raise AssertionError("the billing run should not need ClickHouse here")


def billing(pool: AsyncConnectionPool, batch: int = 5000) -> BillingRun:
    return BillingRun(pool, no_clickhouse, timedelta(hours=24), batch=batch)


async def test_a_month_of_the_four_tiers_and_payg_to_the_cent(pool, tenant) -> None:
    since = at("2025-01-10")
    usage = {
        "free": {"api_calls": [300, 500]},
        "starter": {"api_calls": [40_000, 25_000]},
        "pro": {"api_calls": [600_000, 12_345]},
        "enterprise": {"api_calls": [5_000_000, 1]},
        "payg": {
            "api_calls": [4_000_000, 6_000_000],
            "storage_gb": [120, 150, 90],
            "compute_seconds": [3_000, 4_200],
        },
    }
    for plan, meters in usage.items():
        await subscribe(pool, f"{tenant}-{plan}", plan, since)
        for meter, days in meters.items():
            for offset, value in enumerate(days):
                await record_usage(
                    pool, f"{tenant}-{plan}", meter, date(2025, 3, 3 + offset), value
                )
    await record_usage(pool, f"{tenant}-pro", "api_calls", date(2025, 2, 28), 10**6)  # not March
    await record_usage(pool, f"{tenant}-pro", "api_calls", date(2025, 4, 1), 10**6)  # nor this

    report = await billing(pool).run(date(2025, 3, 1), now=at("2025-04-05"), finalize=True)
    assert report.written >= 5

    expected = {
        "free": [("api_calls", D("0.00"))],
        "starter": [("starter", D("49.00")), ("api_calls", D("15.00"))],
        # 112,345 x 0.0005 = 56.1725
        "pro": [("pro", D("199.00")), ("api_calls", D("56.17"))],
        # 1 x 0.0002 rounds to nothing
        "enterprise": [("enterprise", D("999.00")), ("api_calls", D("0.00"))],
        # 90,000 x .001 + 900,000 x .0005 + 9,000,000 x .0002; storage peak 150 GB;
        # compute 7,200 s less 3,600 free
        "payg": [
            ("api_calls", D("2340.00")),
            ("compute_seconds", D("18.00")),
            ("storage_gb", D("31.25")),
        ],
    }
    for plan, lines in expected.items():
        invoice = await invoice_of(pool, f"{tenant}-{plan}")
        assert amounts(invoice) == lines, plan
        assert invoice.total == sum(amount for _, amount in lines)
        assert (invoice.period, invoice.status) == ("2025-03", InvoiceStatus.FINALIZED)
        assert invoice.period_start == at("2025-03-01") and invoice.period_end == at("2025-04-01")


async def test_upgrade_mid_period_and_an_unpaid_trial(pool, tenant) -> None:
    upgrader, trialist = f"{tenant}-up", f"{tenant}-trial"
    await subscribe(pool, upgrader, "starter", at("2025-01-01"))
    await change(pool, upgrader, at("2025-05-11"), plan="pro")  # 10 of 31 days on starter
    for day in range(1, 32):
        await record_usage(pool, upgrader, "api_calls", date(2025, 5, day), 10_000)
    await subscribe(
        pool, trialist, "pro", at("2025-05-10"), status="trial", trial_ends_at=at("2025-05-24")
    )
    await change(pool, trialist, at("2025-05-24T12:00"), status="active")
    for day in range(10, 32):
        await record_usage(pool, trialist, "api_calls", date(2025, 5, day), 100_000)

    await billing(pool).run(date(2025, 5, 1), now=at("2025-06-03"), finalize=True)

    # starter 49 x 10/31 = 15.806..; pro 199 x 21/31 = 134.806..; usage: starter's
    # 100,000 calls less 50,000 included at .001; pro's 210,000 all included
    assert amounts(await invoice_of(pool, upgrader)) == [
        ("starter", D("15.81")),
        ("pro", D("134.81")),
        ("api_calls", D("50.00")),
        ("api_calls", D("0.00")),
    ]
    # fee from the 24th at noon: 199 x 7.5/31 = 48.145..; usage from the 24th (8 days)
    # 800,000 less 500,000 included at .0005
    assert amounts(await invoice_of(pool, trialist)) == [
        ("pro", D("48.15")),
        ("api_calls", D("150.00")),
    ]


async def test_rerunning_never_duplicates_and_finalized_invoices_never_change(pool, tenant):
    customer = f"{tenant}-idem"
    await subscribe(pool, customer, "starter", at("2025-06-15"))
    await record_usage(pool, customer, "api_calls", date(2025, 7, 4), 60_000)
    run = billing(pool)
    in_grace = at("2025-08-01T06:00")  # period ended, grace running: drafts only

    await run.run(date(2025, 7, 1), now=in_grace)
    first = await invoice_of(pool, customer)
    assert (first.status, first.total) == (InvoiceStatus.DRAFT, D("59.00"))

    await run.run(date(2025, 7, 1), now=in_grace)
    assert await invoice_of(pool, customer) == first  # nothing to do: not even recomputed

    await record_usage(pool, customer, "api_calls", date(2025, 7, 30), 1_000)  # late usage
    await run.run(date(2025, 7, 1), now=in_grace)
    changed = await invoice_of(pool, customer)
    assert (changed.id, changed.status, changed.total) == (first.id, "draft", D("60.00"))

    await run.run(date(2025, 7, 1), now=in_grace, finalize=True)
    final = await invoice_of(pool, customer)
    assert (final.id, final.status, final.total) == (first.id, "finalized", D("60.00"))

    await record_usage(pool, customer, "api_calls", date(2025, 7, 31), 50_000)
    await run.run(date(2025, 7, 1), now=at("2025-09-01"))
    assert await invoice_of(pool, customer) == final


async def test_drafts_finalize_after_grace_once_the_rollups_caught_up(pool, tenant) -> None:
    customer = f"{tenant}-grace"
    await subscribe(pool, customer, "pro", at("2025-08-01"))
    run = billing(pool)
    saved = await watermarks.read(pool)
    try:
        await watermarks.write(pool, at("2025-09-01T12:00"))
        await run.run(date(2025, 8, 1), now=at("2025-09-03"))  # past grace, rollups are not
        assert (await invoice_of(pool, customer)).status == "draft"
        await watermarks.write(pool, at("2025-09-02T00:00"))
        await run.run(date(2025, 8, 1), now=at("2025-09-03"))
        assert (await invoice_of(pool, customer)).status == "finalized"
    finally:
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM rollup_state WHERE name = 'usage'")
        if saved is not None:
            await watermarks.write(pool, saved)


async def test_open_periods_and_customers_who_joined_later_get_no_invoice(pool, tenant):
    await subscribe(pool, f"{tenant}-late", "pro", at("2025-10-20"))
    await subscribe(pool, f"{tenant}-early", "pro", at("2025-09-20"))
    await billing(pool).run(date(2025, 9, 1), now=at("2025-09-25"))  # not ended yet
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM invoices WHERE customer_id LIKE %s", (f"{tenant}-%",)
        )
        assert (await cur.fetchone()) == (0,)
    await billing(pool).run(date(2025, 9, 1), now=at("2025-10-25"))
    early = await invoice_of(pool, f"{tenant}-early")
    assert amounts(early) == [("pro", D("72.97")), ("api_calls", D("0.00"))]  # 199 x 11/30
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM invoices WHERE customer_id = %s", (f"{tenant}-late",)
        )
        assert (await cur.fetchone()) == (0,)


async def test_a_crashed_run_resumes_after_its_last_batch(pool, tenant, monkeypatch) -> None:
    customers = [f"{tenant}-crash-{i}" for i in range(6)]
    for customer in customers:
        await subscribe(pool, customer, "starter", at("2024-01-01"))
        await record_usage(pool, customer, "api_calls", date(2024, 2, 10), 51_000)
    real_write, calls = run_module._write, 0

    async def crashing_write(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ConnectionError("killed mid-run")
        return await real_write(*args, **kwargs)

    monkeypatch.setattr(run_module, "_write", crashing_write)
    with pytest.raises(ConnectionError):
        await billing(pool, batch=2).run(date(2024, 2, 1), now=at("2024-03-05"))
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT cursor, finished_at FROM billing_runs WHERE period = '2024-02'"
        )
        cursor, finished = await cur.fetchone()
    assert cursor and finished is None

    monkeypatch.setattr(run_module, "_write", real_write)
    report = await billing(pool, batch=2).run(date(2024, 2, 1), now=at("2024-03-05"))
    assert report.resumed_after == cursor
    for customer in customers:
        assert (await invoice_of(pool, customer)).total == D("50.00")
    again = await billing(pool, batch=2).run(date(2024, 2, 1), now=at("2024-03-05"))
    assert again.resumed_after == "" and again.written == 0


async def test_one_run_per_period_at_a_time(pool, tenant) -> None:
    first = billing(pool)
    async with pool.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext('tally.billing.2023-01'))")
        try:
            with pytest.raises(RunInProgress):
                await first.run(date(2023, 1, 1), now=at("2023-03-01"))
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext('tally.billing.2023-01'))")
    await asyncio.wait_for(first.run(date(2023, 1, 1), now=at("2023-03-01")), 30)
