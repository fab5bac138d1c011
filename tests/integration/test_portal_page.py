"""The customer dashboard over the real stores: its numbers are the JSON APIs' numbers,
it shows one customer only (and, for a restricted link, some meters only), a billing
that cannot be read empties its own sections and nothing else, and a customer signs in
with its own API key."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from bs4 import BeautifulSoup, Tag
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.catalog import Meter
from schemas.events import utcnow
from schemas.windows import Window, bucket_start
from services.api.portal.figures import money, number
from services.common.broker import free_port
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.accounts_support import sign_up
from tests.portal_support import (
    ENDPOINTS,
    SERVICE,
    client_of,
    customer_with_usage,
    dashboard_plan,
    open_portal,
    past_invoice,
    tally_app,
)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with tally_app(settings) as app, client_of(app) as client:
        yield client


async def read(api: httpx.AsyncClient, path: str, **params: Any) -> Any:
    reply = await api.get(path, params=params, headers=SERVICE)
    assert reply.status_code == 200, reply.text
    return reply.json()


def soup(page: httpx.Response) -> BeautifulSoup:
    return BeautifulSoup(page.text, "html.parser")


def one(html: BeautifulSoup | Tag, selector: str) -> Tag:
    found = html.select_one(selector)
    assert found is not None, f"no {selector}"
    return found


def text(html: BeautifulSoup | Tag, selector: str) -> str:
    return one(html, selector).get_text(" ", strip=True)


def rows(table: Tag) -> list[list[str]]:
    return [
        [cell.get_text(" ", strip=True) for cell in row.find_all("td")]
        for row in table.select("tbody tr")
    ]


async def test_the_page_shows_what_the_apis_answer(
    api: httpx.AsyncClient,
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    pool: AsyncConnectionPool,
    meters: dict[str, list[Meter]],
) -> None:
    customer, _ = await customer_with_usage(
        api, settings, ch, redis, pool, meters, dashboard_plan()
    )
    page = await open_portal(api, customer)
    assert page.headers["cache-control"] == "no-store"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    html = soup(page)
    assert text(html, "#customer") == customer

    limits = await read(api, f"/v1/customers/{customer}/limits")
    quotas = [q for q in limits["limits"] if q["kind"] == "quota"]
    assert {q["meter"] for q in quotas} == {"api_calls", "compute_seconds"}
    for quota in quotas:
        meter, name = quota["meter"], quota["policy"]
        card = one(html, f'.quota[data-meter="{meter}"][data-name="{name}"]')
        assert text(card, ".used") == number(Decimal(quota["used"]))
        assert text(card, ".limit") == number(Decimal(quota["limit"]))
        assert text(card, ".remaining") == number(Decimal(quota["remaining"]))
        assert datetime.fromisoformat(quota["reset_at"]).strftime("%Y-%m-%d") in card.text
    upcoming = await read(api, f"/v1/customers/{customer}/invoices/upcoming")
    invoice, forecast = upcoming["invoice"], upcoming["forecast"]
    [storage] = [line for line in invoice["lines"] if line["meter"] == "storage_gb"]
    included = one(html, ".quota[data-meter=storage_gb][data-name=included]")
    assert (text(included, ".used"), text(included, ".limit")) == (
        number(Decimal(storage["quantity"])),
        "100",
    )
    # 49 of 98 calls, 750 of 1,000 seconds, 95 of 100 GB: green, amber, red
    levels = {card["data-meter"]: one(card, ".meter")["class"] for card in html.select(".quota")}
    assert levels == {
        "api_calls": ["meter"],
        "compute_seconds": ["meter", "warn"],
        "storage_gb": ["meter", "over"],
    }

    rates = {row[0]: row for row in rows(one(html, "#rates"))}
    for rate in (r for r in limits["limits"] if r["kind"] == "rate"):
        assert rates[rate["policy"]][1] == number(Decimal(rate["limit"]))
    assert rates["search-per-second"][3] == "/v1/search"

    since = bucket_start(Window.DAY, utcnow()) - timedelta(days=29)
    usage = await read(
        api,
        f"/v1/customers/{customer}/usage",
        meter="api_calls",
        window="day",
        **{"from": since.isoformat()},
    )
    days = rows(one(html, "section.usage[data-meter=api_calls] table.days"))
    assert len(days) == 30
    assert days == [[p["start"][:10], number(Decimal(p["value"]))] for p in usage["data"]]
    assert days[-1][1] == "49"

    month = bucket_start(Window.MONTH, utcnow())
    ranked = await read(
        api,
        f"/v1/customers/{customer}/usage",
        meter="api_calls",
        group_by="endpoint",
        order_by="value",
        limit=5,
        **{"from": month.isoformat()},
    )
    top = rows(one(html, "table.top[data-meter=api_calls]"))
    assert top == [[t["groups"]["endpoint"], number(Decimal(t["value"]))] for t in ranked["totals"]]
    assert [row[0] for row in top] == list(ENDPOINTS)[:5]

    currency = invoice["currency"]
    assert text(html, "#to-date") == money(Decimal(invoice["total"]), currency)
    assert text(html, "#forecast") == money(Decimal(forecast["total"]), currency)
    usage_charges = sum(
        (Decimal(line["amount"]) for line in forecast["lines"] if line["kind"] == "usage"),
        Decimal(0),
    )
    assert text(html, "#overage") == money(usage_charges, currency)
    compute = one(html, "#invoice-meters tr[data-meter=compute_seconds]")
    [line] = [line for line in forecast["lines"] if line["meter"] == "compute_seconds"]
    cells = [td.get_text(strip=True) for td in compute.find_all("td")]
    # The forecast grows with the time left, which shrinks between the two reads
    for shown, exact in zip(cells[3:5], (line["quantity"], line["billable"]), strict=True):
        assert abs(Decimal(shown.replace(",", "")) - Decimal(exact)) < 1, (shown, exact)
    assert cells[5] == money(Decimal(line["amount"]), currency)
    chart = one(html, "script#usage-data[type='application/json']")
    assert "api_calls" in chart.text and not html.select("script:not([src]):not([type])")


async def test_a_customer_never_sees_another(
    api: httpx.AsyncClient,
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    pool: AsyncConnectionPool,
    meters: dict[str, list[Meter]],
) -> None:
    a, _ = await customer_with_usage(
        api, settings, ch, redis, pool, meters, dashboard_plan("49"), compute=750
    )
    b, _ = await customer_with_usage(
        api, settings, ch, redis, pool, meters, dashboard_plan("77"), compute=4321
    )
    a_invoice = await past_invoice(pool, a, "2022-01", "1234.56")
    b_invoice = await past_invoice(pool, b, "2022-01", "6543.21")
    a_page, b_page = (await open_portal(api, a)).text, None
    async with client_of(api._transport.app) as other:  # type: ignore[attr-defined]
        b_page = (await open_portal(other, b)).text
    assert a_invoice in a_page and "1,234.56 USD" in a_page and "750" in a_page
    assert b_invoice in b_page and "6,543.21 USD" in b_page and "4,321" in b_page
    for seen, hidden in (
        (a_page, (b, b_invoice, "6,543.21", "4,321")),
        (b_page, (a, a_invoice, "1,234.56")),
    ):
        for what in hidden:
            assert what not in seen, what


async def test_a_link_for_some_meters_shows_only_those(
    api: httpx.AsyncClient,
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    pool: AsyncConnectionPool,
    meters: dict[str, list[Meter]],
) -> None:
    customer, _ = await customer_with_usage(
        api, settings, ch, redis, pool, meters, dashboard_plan()
    )
    html = soup(await open_portal(api, customer, meters=["compute_seconds"]))
    shown = {
        "quotas": {card["data-meter"] for card in html.select(".quota")},
        "charts": {s["data-meter"] for s in html.select("section.usage")},
        "rankings": {t["data-meter"] for t in html.select("table.top")},
        "invoice lines": {r["data-meter"] for r in html.select("#invoice-meters tr[data-meter]")},
        "alerts": {row[0] for row in rows(one(html, "#alerts"))},
    }
    only = {"compute_seconds"}
    assert shown == {
        "quotas": only,
        "charts": only,
        "rankings": set(),
        "invoice lines": only,
        "alerts": only,
    }
    assert "api_calls" not in one(html, "#usage-data").text


async def test_billing_unreadable_empties_its_sections_only(
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    pool: AsyncConnectionPool,
    meters: dict[str, list[Meter]],
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with tally_app(settings, billing_url=nowhere) as app, client_of(app) as api:
        customer, _ = await customer_with_usage(
            api, settings, ch, redis, pool, meters, dashboard_plan()
        )
        html = soup(await open_portal(api, customer))
    assert "billing could not be read" in text(html, "#invoice-unavailable")
    assert len(html.select(".unavailable")) == 4  # invoice, invoices, alerts, endpoints
    assert html.select_one("#allowances-unavailable") is not None
    assert {card["data-meter"] for card in html.select(".quota")} == {
        "api_calls",
        "compute_seconds",
    }
    assert len(rows(one(html, "section.usage[data-meter=api_calls] table.days"))) == 30
    assert rows(one(html, "#rates"))


async def test_a_customer_signs_in_with_its_key(settings: Settings) -> None:
    async with tally_app(settings, ip_auth_failures_per_minute=3) as app, client_of(app) as api:
        form = await api.get("/portal")
        assert form.status_code == 200 and 'name="api_key"' in form.text
        assert form.headers["cache-control"] == "no-store"
        account = await sign_up(api)
        customer, key = account.customer, account.key
        endpoint = f"http://127.0.0.1:9/hooks/{uuid.uuid4().hex}"
        made = await api.post(
            f"/v1/customers/{customer}/webhook-endpoints", json={"url": endpoint}, headers=SERVICE
        )
        assert made.status_code == 201, made.text
        rule = await api.post(
            f"/v1/customers/{customer}/alerts",
            json={"meter": "api_calls", "kind": "usage", "thresholds": [777]},
            headers=SERVICE,
        )
        assert rule.status_code == 201, rule.text

        narrow = await api.post(
            "/v1/keys", json={"scopes": ["enforce"]}, headers=account.auth
        )  # a key for enforcement only may not read usage, here either
        assert narrow.status_code == 201, narrow.text
        refused = await api.post("/portal/login", data={"api_key": narrow.json()["key"]})
        assert refused.status_code == 403 and "usage:read" in refused.text
        assert (
            "set-cookie" not in refused.headers
            or 'tally_portal=""' in refused.headers["set-cookie"]
        )

        wrong = await api.post("/portal/login", data={"api_key": "tally_live_wrong"})
        assert wrong.status_code == 401 and 'name="api_key"' in wrong.text
        assert 'class="error"' in wrong.text
        entered = await api.post("/portal/login", data={"api_key": key})
        assert entered.status_code == 303 and entered.headers["location"] == "/portal"
        cookie = entered.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Path=/portal" in cookie and "SameSite=lax" in cookie
        page = await api.get("/portal")
        assert page.status_code == 200
        html = soup(page)
        assert text(html, "#customer") == customer
        assert [row[0] for row in rows(one(html, "#endpoints"))] == [endpoint]
        assert ["api_calls", "usage", "777", "you"] in rows(one(html, "#alerts"))

        revoked = await api.delete(f"/v1/keys/{account.key_id}", headers=account.auth)
        assert revoked.status_code == 204, revoked.text
        ended = await api.get("/portal")
        assert ended.status_code == 401 and "revoked" in ended.text

        out = await api.post("/portal/logout")
        assert out.status_code == 303 and 'tally_portal=""' in out.headers["set-cookie"]
        for _ in range(2):
            await api.post("/portal/login", data={"api_key": "tally_live_wrong"})
        guessing = await api.post("/portal/login", data={"api_key": key})
        assert guessing.status_code == 429 and "Retry-After" in guessing.headers
