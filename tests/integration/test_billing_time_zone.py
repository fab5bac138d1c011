"""A customer billed in its own time zone: periods from local midnight to local midnight,
usage summed over exactly those hours, and a fee prorated over a month that daylight
saving time makes an hour short — to the cent."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool

from schemas.invoices import InvoiceStatus
from services.billing.invoicing import reader
from services.billing.invoicing.run import BillingRun
from services.common.settings import Settings
from tests.accounts_support import ADMIN, running_api
from tests.billing_support import amounts, at, change, invoice_of, subscribe

D = Decimal


def no_clickhouse():  # the default catalog prices no distinct-count meter
    raise AssertionError("the billing run should not need ClickHouse here")


async def hours(pool: AsyncConnectionPool, customer: str, usage: dict[datetime, int]) -> None:
    """Rolled-up hours, as the rollup writes them."""
    async with pool.connection() as conn:
        await conn.cursor().executemany(
            "INSERT INTO usage_hourly (customer, meter, hour, value, watermark)"
            " VALUES (%s, 'api_calls', %s, %s, now())",
            [(customer, hour, value) for hour, value in usage.items()],
        )


async def test_a_new_york_month_bills_its_own_hours(pool: AsyncConnectionPool, tenant: str) -> None:
    customer = f"{tenant}-ny"
    await subscribe(pool, customer, "starter", at("2026-01-01"), timezone="America/New_York")
    await hours(
        pool,
        customer,
        {
            at("2026-03-01T04:00"): 10_000,  # 28 February, 23:00 in New York
            at("2026-03-01T05:00"): 30_000,  # 1 March, midnight
            at("2026-04-01T03:00"): 30_000,  # 31 March, 23:00 (daylight saving time)
            at("2026-04-01T04:00"): 7_000,  # 1 April, midnight
        },
    )
    await BillingRun(pool, no_clickhouse, timedelta(hours=24)).run(
        date(2026, 3, 1), now=at("2026-04-05"), finalize=True
    )
    march = await invoice_of(pool, customer)
    assert (march.period, march.status) == ("2026-03", InvoiceStatus.FINALIZED)
    assert (march.period_start, march.period_end) == (
        at("2026-03-01T05:00"),
        at("2026-04-01T04:00"),
    )
    # 60,000 calls, 50,000 included, at 0.001
    assert amounts(march) == [("starter", D("49.00")), ("api_calls", D("10.00"))]
    assert march.lines[1].quantity == 60_000
    await hours(pool, customer, {at("2026-03-15T12:00"): 1_000})
    async with pool.connection() as conn:  # the forecast follows the local period too
        upcoming = await reader.upcoming(conn, no_clickhouse, customer, at("2026-03-16T03:00"))
    assert upcoming is not None
    assert upcoming.invoice.period_start == at("2026-03-01T05:00")
    assert upcoming.invoice.lines[1].quantity == 31_000
    # The window: seven local days, 9 March (04:00 UTC, daylight saving time) to now at
    # 15 March 23:00: 167 hours; 385 hours left: 31,000 + 1,000 x 385 / 167
    forecast = upcoming.forecast.lines[1].quantity
    assert forecast.quantize(D("0.01")) == D("33305.39")


async def test_an_upgrade_is_prorated_over_the_743_hours_of_march(
    pool: AsyncConnectionPool, tenant: str
) -> None:
    customer = f"{tenant}-ny-up"
    await subscribe(pool, customer, "starter", at("2026-01-01"), timezone="America/New_York")
    await change(pool, customer, at("2026-03-11T04:00"), plan="pro")  # 11 March, midnight EDT
    await hours(pool, customer, {at("2026-03-10T12:00"): 60_000, at("2026-03-20T12:00"): 1})
    await BillingRun(pool, no_clickhouse, timedelta(hours=24)).run(
        date(2026, 3, 1), now=at("2026-04-05"), finalize=True
    )
    # starter 239 of 743 hours: 49 x 239/743 = 15.7617…; pro 504 hours: 199 x 504/743 =
    # 134.986…; starter's days had 60,000 calls, 10,000 over its included units
    assert amounts(await invoice_of(pool, customer)) == [
        ("starter", D("15.76")),
        ("pro", D("134.99")),
        ("api_calls", D("10.00")),
        ("api_calls", D("0.00")),
    ]


async def test_the_admin_api_sets_a_billing_time_zone_until_the_first_invoice(
    settings: Settings, pool: AsyncConnectionPool
) -> None:
    async with running_api(settings) as api:
        new = {"email": f"{uuid.uuid4().hex[:10]}@example.com", "plan": "starter"}
        for zone, says in (("Mars/Olympus", "unknown time zone"), ("Asia/Kolkata", "UTC+05:30")):
            refused = await api.post(
                "/v1/admin/customers", json=new | {"timezone": zone}, headers=ADMIN
            )
            assert refused.status_code == 422, refused.text
            assert refused.json()["errors"][0]["field"] == "body.timezone"
            assert says in refused.json()["errors"][0]["reason"]
        made = await api.post(
            "/v1/admin/customers", json=new | {"timezone": "Asia/Tokyo"}, headers=ADMIN
        )
        assert made.status_code == 201, made.text
        customer = made.json()["customer"]
        assert customer["timezone"] == "Asia/Tokyo"
        path = f"/v1/admin/customers/{customer['id']}"
        moved = await api.patch(path, json={"timezone": "Europe/Berlin"}, headers=ADMIN)
        assert moved.status_code == 200 and moved.json()["timezone"] == "Europe/Berlin"
        async with pool.connection() as conn:  # billed once: an invoice of its own
            await conn.execute(
                "INSERT INTO invoices (id, customer_id, period, period_start, period_end,"
                " status, currency, lines, subtotal, total)"
                " VALUES (%s, %s, '2026-11', '2026-11-01', '2026-12-01', 'draft', 'usd',"
                " '[]', 0, 0)",
                (f"inv_{uuid.uuid4().hex[:20]}", customer["id"]),
            )
        locked = await api.patch(path, json={"timezone": "UTC"}, headers=ADMIN)
        assert locked.status_code == 409, locked.text
        assert locked.json()["type"].endswith("/timezone-locked")
