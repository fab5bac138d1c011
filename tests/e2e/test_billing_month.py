"""A month end to end: raw events through the aggregator's ClickHouse sink, the rollup,
and the billing run, against amounts computed by hand."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from schemas.envelope import StoredEvent
from schemas.events import utcnow
from schemas.plans import Plan, Price
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.api.catalog import store as catalog_store
from services.billing.invoicing.run import BillingRun
from services.billing.rollup.job import Rollup
from tests.billing_support import amounts, at, invoice_of, subscribe

D = Decimal
SEPTEMBER = date(2026, 9, 1)


def events(customer: str, kind: str, count: int, value: str = "1") -> list[StoredEvent]:
    """``count`` events spread over September, each sent twice (a client retry)."""
    made = []
    for n in range(count):
        when = datetime(2026, 9, 1, tzinfo=UTC) + timedelta(minutes=(n * 37) % (30 * 24 * 60))
        made.append(StoredEvent(f"{kind}-{n}", "e2e", kind, customer, when, D(value), {}, utcnow()))
    return made + made


async def test_a_month_through_the_pipeline_to_invoices(ch, pool, tenant) -> None:
    seats = Plan(
        id=f"seats-{tenant}",
        name="Seats",
        price=D("10"),
        prices={"active_users": Price(unit_price=D("2"), included=D(1))},
    )
    async with pool.connection() as conn:
        await catalog_store.save_plan(conn, seats, "test")
    plans = ["free", "starter", "pro", "enterprise", "payg", seats.id]
    for plan in plans:
        await subscribe(pool, f"{tenant}-{plan}", plan, at("2026-08-01"))
    sink = ClickHouseSink(ch)
    await sink.write(events(f"{tenant}-free", "api_call", 700))
    await sink.write(events(f"{tenant}-starter", "api_call", 300))
    await sink.write(events(f"{tenant}-payg", "api_call", 12_345))
    await sink.write(events(f"{tenant}-payg", "storage", 40, value="150"))
    peak = datetime(2026, 9, 20, 8, tzinfo=UTC)
    await sink.write(
        [
            StoredEvent(
                "storage-peak", "e2e", "storage", f"{tenant}-payg", peak, D("180.5"), {}, utcnow()
            )
        ]
    )
    await sink.write(events(f"{tenant}-payg", "compute", 360, value="20.5"))
    await sink.write(
        [  # the same 45 users on 10 days: 450 daily sightings, 45 distinct users
            StoredEvent(
                f"seat-{day}-{user}",
                "e2e",
                "user",
                f"{tenant}-{seats.id}",
                datetime(2026, 9, 1 + day, 12, tzinfo=UTC),
                D(1),
                {"user": f"u{user}"},
                utcnow(),
            )
            for day in range(0, 30, 3)
            for user in range(45)
        ]
    )

    await Rollup(ch, pool, timedelta(0)).run_range(SEPTEMBER, date(2026, 9, 30))
    run = BillingRun(pool, lambda: ch, timedelta(hours=24))
    await run.run(SEPTEMBER, now=at("2026-10-03"), finalize=True)

    assert amounts(await invoice_of(pool, f"{tenant}-free")) == [("api_calls", D("0.00"))]
    assert amounts(await invoice_of(pool, f"{tenant}-starter")) == [
        ("starter", D("49.00")),
        ("api_calls", D("0.00")),
    ]
    assert (await invoice_of(pool, f"{tenant}-pro")).total == D("199.00")
    assert (await invoice_of(pool, f"{tenant}-enterprise")).total == D("999.00")
    # 12,345 calls: 2,345 over the free 10,000 at 0.001; storage peaks at 180.5 GB:
    # 95 x 0.25 + 80.5 x 0.15; compute 360 x 20.5 = 7,380 s, 3,780 over at 0.005
    payg = await invoice_of(pool, f"{tenant}-payg")
    assert amounts(payg) == [
        ("api_calls", D("2.35")),
        ("compute_seconds", D("18.90")),
        ("storage_gb", D("35.83")),
    ]
    assert payg.total == D("57.08")
    # 45 distinct users over the month, 1 included, 2.00 each (not the 450 daily sightings)
    assert amounts(await invoice_of(pool, f"{tenant}-{seats.id}")) == [
        (seats.id, D("10.00")),
        ("active_users", D("88.00")),
    ]
