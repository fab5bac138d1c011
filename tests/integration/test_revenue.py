"""The revenue view against real PostgreSQL and Redis, in a database of its own: MRR
equal to a hand computation, usage revenue equal to what the invoices (written by the
real billing run) say to the cent, the admin token's guard, bad months named, and the
page showing the JSON's numbers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from bs4 import BeautifulSoup
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.invoices import InvoiceStatus, LineKind
from schemas.plans import Interval, Plan
from schemas.windows import Window, bucket_id, bucket_start
from services.api.catalog import store as catalog_store
from services.billing.invoicing import reader as invoices
from services.billing.invoicing.run import BillingRun
from services.common.settings import Settings
from tests.billing_support import at, change, record_usage, subscribe
from tests.conftest import REDIS_URL
from tests.revenue_support import ADMIN, own_database, plain, revenue_client, rows, text

D = Decimal
KINDS: dict[InvoiceStatus | None, str | None] = {
    InvoiceStatus.DRAFT: "to_date",
    InvoiceStatus.VOID: None,
}
CSP = "default-src 'self'; frame-ancestors 'none'"
MONTHS = 36  # back to January 2024 from late 2026: the seeded history is in 2025


def no_clickhouse():  # the default catalog prices no distinct-count meter
    raise AssertionError("not needed here")


@pytest.fixture(scope="module")
async def seeded() -> AsyncIterator[tuple[str, dict[str, str]]]:
    """One database: customers with a past, their invoices for February to April 2025."""
    async with own_database() as url, AsyncConnectionPool(url, open=False) as pool:
        names = await _seed(pool)
        yield url, names


async def _seed(pool: AsyncConnectionPool) -> dict[str, str]:
    async with pool.connection() as conn:
        await catalog_store.save_plan(
            conn, Plan(id="yearly", name="Yearly", price=D(2000), interval=Interval.YEAR), "t"
        )
        await catalog_store.save_plan(
            conn, Plan(id="euro", name="Euro", price=D(30), currency="eur"), "t"
        )
    c = {k: f"rev-{k}" for k in "abcdefg"}
    await subscribe(pool, c["a"], "starter", at("2025-01-10"))
    await change(pool, c["a"], at("2025-03-15"), plan="pro")  # expansion 150
    await subscribe(pool, c["b"], "pro", at("2025-02-01"), "trial", at("2025-02-15"))
    await change(pool, c["b"], at("2025-02-15"), status="active")  # new 199 in February
    await change(pool, c["b"], at("2025-03-20"), status="cancelled")  # churn 199
    await subscribe(pool, c["c"], "yearly", at("2025-01-01"))  # 166.67 a month
    await subscribe(pool, c["d"], "pro", at("2025-01-05"))
    await change(pool, c["d"], at("2025-01-06"), status="past_due")  # still counts
    await subscribe(pool, c["e"], "free", at("2025-01-07"))
    await subscribe(pool, c["f"], "starter", at("2025-01-10"))
    await change(pool, c["f"], at("2025-02-01"), status="suspended")  # churn 49
    await subscribe(pool, c["g"], "euro", at("2025-02-10"))
    for day in (3, 17):
        await record_usage(pool, c["a"], "api_calls", date(2025, 3, day), 40_000)
        await record_usage(pool, c["d"], "api_calls", date(2025, 2, day), 300_000)
        await record_usage(pool, c["d"], "api_calls", date(2025, 3, day), 260_000)
        await record_usage(pool, c["d"], "api_calls", date(2025, 4, day), 270_001)
    run = BillingRun(pool, no_clickhouse, timedelta(hours=24))
    for month in (date(2025, 2, 1), date(2025, 3, 1)):
        await run.run(month, now=at("2025-04-05"), finalize=True)
    await run.run(date(2025, 4, 1), now=at("2025-05-01T06:00"))  # within the grace: a draft
    async with pool.connection() as conn:
        await conn.execute(  # d's February payment failed; f's March invoice was voided
            "UPDATE invoices SET status = 'payment_failed'"
            " WHERE customer_id = %s AND period = '2025-02'",
            (c["d"],),
        )
        await conn.execute(
            "UPDATE invoices SET status = 'void' WHERE customer_id = %s AND period = '2025-03'",
            (c["a"],),
        )
    return c


@pytest.fixture
async def client(
    seeded: tuple[str, dict[str, str]],
) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncConnectionPool, Redis]]:
    url, _ = seeded
    mine = Settings(database_url=url, redis_url=REDIS_URL)
    redis = Redis.from_url(REDIS_URL)
    async with (
        AsyncConnectionPool(url, open=False) as pool,
        revenue_client(mine, pool, redis) as http,
    ):
        yield http, pool, redis
    await redis.aclose()


async def _revenue(http: httpx.AsyncClient, months: int = MONTHS) -> dict[str, Any]:
    reply = await http.get("/v1/admin/revenue", params={"months": months}, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    found: dict[str, Any] = reply.json()
    return found


def _month(body: dict[str, Any], currency: str, month: str) -> dict[str, Any]:
    [block] = [b for b in body["movements"] if b["currency"] == currency]
    [found] = [m for m in block["months"] if m["month"] == month]
    assert isinstance(found, dict)
    return found


async def test_mrr_and_its_movements_equal_a_hand_computation(client) -> None:
    http, _, _ = client
    body = await _revenue(http)
    usd, eur = body["mrr"]  # sorted by currency: eur, usd
    usd, eur = (usd, eur) if usd["currency"] == "usd" else (eur, usd)
    # a on pro 199, c yearly 2000 / 12 = 166.67, d past_due on pro 199
    assert usd == {
        "currency": "usd",
        "mrr": "564.67",
        "arr": "6776.04",
        "paying_customers": 3,
        "arpu": "188.22",
    }
    assert (eur["mrr"], eur["paying_customers"], eur["arpu"]) == ("30.00", 1, "30.00")
    jan, feb, mar = (_month(body, "usd", f"2025-0{m}") for m in (1, 2, 3))
    # January: a 49, c 166.67, d 199, f 49 new
    assert (jan["starting"], jan["new"], jan["ending"]) == ("0", "463.67", "463.67")
    assert jan["new_customers"] == 4
    assert (feb["new"], feb["churn"], feb["ending"]) == ("199.00", "49.00", "613.67")
    assert (mar["expansion"], mar["churn"], mar["ending"]) == ("150.00", "199.00", "564.67")
    assert _month(body, "eur", "2025-02")["new"] == "30.00"
    for block in body["movements"]:
        for m in block["months"]:
            gained = D(m["new"]) + D(m["expansion"]) + D(m["reactivation"])
            lost = D(m["contraction"]) + D(m["churn"])
            assert D(m["ending"]) == D(m["starting"]) + gained - lost
    assert block["months"][-1]["to_date"] and not block["months"][0]["to_date"]
    trials = {m["month"]: m for m in body["trials"]["months"]}
    assert trials["2025-02"] == {
        "month": "2025-02",
        "started": 1,
        "converted": 1,
        "expired": 0,
        "conversion_rate": "1.0000",
    }
    by_plan = {(p["plan"], p["status"]): p["customers"] for p in body["customers_by_plan"]}
    assert by_plan[("pro", "past_due")] == 1 and by_plan[("starter", "suspended")] == 1
    assert body["customers"] == 7


async def test_usage_revenue_is_what_the_invoices_say_to_the_cent(client, seeded) -> None:
    http, pool, _ = client
    body = await _revenue(http)
    _, names = seeded
    expected: dict[str, dict[str, Decimal]] = {}
    counted: dict[str, int] = {}
    async with pool.connection() as conn:
        for customer in names.values():
            for invoice in await invoices.listed(conn, customer):
                usage = sum(
                    (line.amount for line in invoice.lines if line.kind is LineKind.USAGE), D(0)
                )
                kind = KINDS.get(invoice.status, "invoiced")
                if kind == "invoiced" and any(x.kind is LineKind.USAGE for x in invoice.lines):
                    counted[invoice.period] = counted.get(invoice.period, 0) + 1
                if kind:
                    month = expected.setdefault(invoice.period, {"invoiced": D(0), "to_date": D(0)})
                    month[kind] += usage
    [usd] = body["usage_revenue"]
    found = {m["month"]: m for m in usd["months"]}
    for period, month in expected.items():
        assert D(found[period]["invoiced"]) == month["invoiced"], period
        assert D(found[period]["to_date"]) == month["to_date"], period
    # d, February: 600,000 calls on pro, 500,000 included, 0.0005 each
    assert found["2025-02"]["invoiced"] == "50.00" and found["2025-02"]["by_meter"] == {
        "api_calls": "50.00"
    }
    assert D(found["2025-04"]["to_date"]) == D("20.00")  # 540,002 - 500,000 = 40,002 x .0005
    assert sum(D(m["invoiced"]) for m in usd["months"]) == sum(
        m["invoiced"] for m in expected.values()
    )
    [due] = [b for b in body["past_due"]["balances"] if b["currency"] == "usd"]
    assert (due["balance"], due["invoices"], due["customers"]) == ("249.00", 1, 1)
    assert body["past_due"]["customers_past_due"] == 1


async def test_this_months_usage_is_the_live_counters_and_the_rollups(client, seeded) -> None:
    http, pool, redis = client
    _, names = seeded
    now = datetime.now(UTC)
    key = redis_keys.counters(names["a"], "api_calls", Window.MONTH, bucket_id(Window.MONTH, now))
    await redis.hset(key, "*", 1_234 * 10**6)  # as the aggregator counts: micro-units
    await redis.expire(key, 3600)
    async with pool.connection() as conn:  # d's month only in the rollup (Redis lost it)
        await conn.execute(
            "INSERT INTO usage_monthly (customer, meter, month, value, watermark)"
            " VALUES (%s, 'api_calls', %s, 766.5, now()) ON CONFLICT DO NOTHING",
            (names["d"], bucket_start(Window.MONTH, now).date()),
        )
    try:
        body = await _revenue(http, 1)
    finally:
        await redis.delete(key)
    [calls] = [m for m in body["usage_this_month"]["meters"] if m["meter"] == "api_calls"]
    assert calls["total"] == "2000.5" and calls["customers"] == 2
    assert calls["top"] == [
        {"customer": names["a"], "quantity": "1234"},
        {"customer": names["d"], "quantity": "766.5"},
    ]
    assert {m["meter"] for m in body["usage_this_month"]["meters"]} >= {
        "api_calls",
        "storage_gb",
        "compute_seconds",
        "active_users",
    }
    assert body["months"] == [now.strftime("%Y-%m")]


async def test_top_customers_by_revenue_rank_invoiced_totals(client, seeded) -> None:
    http, _, _ = client
    body = await _revenue(http)
    # the trailing twelve months from today hold none of 2025's invoices
    assert body["top_by_revenue"]["currencies"] == []
    assert body["top_by_revenue"]["since"] < datetime.now(UTC).strftime("%Y-%m")


async def test_the_admin_token_guards_it_and_bad_months_are_named(client) -> None:
    http, _, _ = client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer tally_x"}):
        reply = await http.get("/v1/admin/revenue", headers=headers)
        assert reply.status_code == 401, reply.text
        assert reply.headers["content-type"].startswith("application/problem+json")
        assert reply.json()["type"] == "https://tally.dev/problems/unauthorized"
    for months in ("0", "abc", "37", "-1"):
        reply = await http.get("/v1/admin/revenue", params={"months": months}, headers=ADMIN)
        assert reply.status_code == 422, reply.text
        assert [e["field"] for e in reply.json()["errors"]] == ["query.months"]
    unauthenticated = await http.get("/v1/admin/revenue", params={"months": "abc"})
    assert unauthenticated.status_code == 401  # the token first: nothing told to strangers


async def test_the_page_shows_the_jsons_numbers(client) -> None:
    http, _, _ = client
    assert (await http.get("/admin/revenue")).headers["location"].endswith("/admin")
    login = await http.get("/admin")
    assert login.status_code == 200 and 'name="token"' in login.text
    assert login.headers["cache-control"] == "no-store"
    wrong = await http.post("/admin/login", data={"token": "nope"})
    assert wrong.status_code == 401 and "Wrong admin token" in wrong.text
    assert "set-cookie" not in wrong.headers
    signed_in = await http.post("/admin/login", data={"token": "dev-admin-token"})
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"].lower()
    for flag in ("httponly", "samesite=strict", "path=/admin", "max-age=43200"):
        assert flag in cookie
    page = await http.get("/admin/revenue")
    assert page.status_code == 200, page.text
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text  # no inline script: JSON data and static files only
    body = await _revenue(http, 12)
    shown = BeautifulSoup(page.text, "html.parser")
    for m in body["mrr"]:
        assert plain(text(shown, f"mrr-{m['currency']}")) == m["mrr"]
        assert plain(text(shown, f"arpu-{m['currency']}")) == m["arpu"]
    assert text(shown, "customers") == str(body["customers"])
    for b in body["past_due"]["balances"]:
        assert plain(text(shown, f"past-due-{b['currency']}")) == b["balance"]
    for block in body["movements"]:
        table = rows(shown, f"movements-{block['currency']}")
        assert len(table) == len(block["months"]) == 12
        for row, m in zip(table, block["months"], strict=True):
            assert row[0].startswith(m["month"])
            fields = ("starting", "new", "expansion", "reactivation", "contraction", "churn")
            assert [plain(c) for c in row[1:]] == [m[f] for f in (*fields, "ending")]
    out = await http.post("/admin/logout")
    assert out.status_code == 303 and 'tally_admin=""' in out.headers["set-cookie"]
    http.cookies.clear()
    assert (await http.get("/admin/revenue")).status_code == 303


async def test_guessing_at_the_form_is_limited_and_https_makes_the_cookie_secure(
    seeded: tuple[str, dict[str, str]],
) -> None:
    url, _ = seeded
    mine = Settings(
        database_url=url,
        redis_url=REDIS_URL,
        ip_auth_failures_per_minute=2,
        public_url="https://tally.example",
    )
    redis = Redis.from_url(REDIS_URL)
    async with (
        AsyncConnectionPool(url, open=False) as pool,
        revenue_client(mine, pool, redis) as http,
    ):
        statuses = [
            (await http.post("/admin/login", data={"token": f"guess-{n}"})).status_code
            for n in range(2)
        ]
        refused = await http.post("/admin/login", data={"token": "dev-admin-token"})
        assert statuses == [401, 401]
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "too many failed credentials" in refused.text
        assert "set-cookie" not in refused.headers
    async with (
        AsyncConnectionPool(url, open=False) as pool,
        revenue_client(mine, pool, redis) as http,  # another address
    ):
        signed_in = await http.post("/admin/login", data={"token": "dev-admin-token"})
        assert signed_in.status_code == 303
        assert "secure" in signed_in.headers["set-cookie"].lower()
    await redis.aclose()


async def test_a_seller_without_customers_sees_zeros_not_errors() -> None:
    async with own_database() as url, AsyncConnectionPool(url, open=False) as pool:
        redis = Redis.from_url(REDIS_URL)
        async with revenue_client(
            Settings(database_url=url, redis_url=REDIS_URL), pool, redis
        ) as http:
            body = await _revenue(http, 2)
            assert (body["mrr"], body["movements"], body["customers"]) == ([], [], 0)
            assert body["trials"]["conversion_rate"] is None
            assert body["past_due"] == {"customers_past_due": 0, "balances": []}
            await http.post("/admin/login", data={"token": "dev-admin-token"})
            page = await http.get("/admin/revenue")
            assert page.status_code == 200, page.text
            shown = BeautifulSoup(page.text, "html.parser")
            assert text(shown, "mrr-none") == "0" and text(shown, "customers") == "0"
        await redis.aclose()
