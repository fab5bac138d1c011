"""Invoices over HTTP: listing, the upcoming invoice with its forecast, and who may see them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import httpx

from services.billing.invoicing import routes
from services.billing.invoicing.run import BillingRun
from services.common.auth import Authenticator
from services.runtime import Component, http_app
from tests.accounts_support import running_api, sign_up
from tests.billing_support import at, record_usage, subscribe

SERVICE = {"Authorization": "Bearer test-token"}


def billing_client(settings, pool, redis) -> httpx.AsyncClient:
    auth = Authenticator(settings, redis, pool)
    app = http_app([Component("billing", routers=[routes.router(pool, auth, _no_clickhouse)])])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")


def _no_clickhouse():
    raise AssertionError("the default catalog prices no distinct-count meter")


async def test_upcoming_invoice_so_far_and_forecast(settings, pool, redis) -> None:
    async with running_api(settings) as api:
        account = await sign_up(api, plan="payg")
    today = datetime.now(UTC).date()
    await record_usage(pool, account.customer, "api_calls", today, 20_000)
    async with billing_client(settings, pool, redis) as client:
        reply = await client.get(
            f"/v1/customers/{account.customer}/invoices/upcoming", headers=account.auth
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    invoice, forecast = body["invoice"], body["forecast"]
    assert invoice["period_start"] == f"{today:%Y-%m}-01T00:00:00Z"
    [calls] = [line for line in invoice["lines"] if line["meter"] == "api_calls"]
    assert (Decimal(calls["quantity"]), Decimal(calls["amount"])) == (
        Decimal(20_000),
        Decimal("10.00"),
    )
    as_of = datetime.fromisoformat(body["as_of"])
    end = datetime.fromisoformat(invoice["period_end"])
    [projected] = [line for line in forecast["lines"] if line["meter"] == "api_calls"]
    # Signed up a moment ago: the 20,000 calls count as one day's pace (a window shorter
    # than 24 h is rated as 24 h), not as the pace of the seconds since sign-up.
    days_left = Decimal((end - as_of).total_seconds()) / 86_400
    assert abs(Decimal(projected["quantity"]) - 20_000 * (1 + days_left)) < Decimal("0.001")
    assert forecast["method"].startswith("recent pace:")
    assert Decimal(forecast["total"]) >= Decimal(invoice["total"])


async def test_listing_invoices_and_who_may_read_them(settings, pool, redis, tenant) -> None:
    async with running_api(settings) as api:
        mine, theirs = await sign_up(api, plan="pro"), await sign_up(api, plan="pro")
    customer = f"{tenant}-listed"
    await subscribe(pool, customer, "starter", at("2022-01-05"))
    await record_usage(pool, customer, "api_calls", date(2022, 2, 7), 50_010)
    run = BillingRun(pool, _no_clickhouse, timedelta(hours=1))
    for month in (1, 2):
        await run.run(date(2022, month, 1), now=at("2022-03-02"), finalize=True)

    async with billing_client(settings, pool, redis) as client:
        listed = await client.get(f"/v1/customers/{customer}/invoices", headers=SERVICE)
        drafts = await client.get(
            f"/v1/customers/{customer}/invoices", params={"status": "draft"}, headers=SERVICE
        )
        own = await client.get(f"/v1/customers/{mine.customer}/invoices", headers=mine.auth)
        other = await client.get(f"/v1/customers/{theirs.customer}/invoices", headers=mine.auth)
        anonymous = await client.get(f"/v1/customers/{customer}/invoices")
        bad_status = await client.get(
            f"/v1/customers/{customer}/invoices", params={"status": "lost"}, headers=SERVICE
        )
        bad_limit = await client.get(
            f"/v1/customers/{customer}/invoices", params={"limit": 0}, headers=SERVICE
        )
        unknown = await client.get("/v1/customers/nobody-at-all/invoices/upcoming", headers=SERVICE)
        unknown_lists = [
            await client.get(f"/v1/customers/nobody-at-all/{what}", headers=SERVICE)
            for what in ("invoices", "credit-notes")
        ]
        known_notes = await client.get(f"/v1/customers/{customer}/credit-notes", headers=SERVICE)

    assert listed.status_code == 200
    periods = [(i["period"], i["status"], i["total"]) for i in listed.json()["invoices"]]
    # January from the 5th: 49 x 27/31; February: 49 + 10 calls x 0.001
    assert periods == [("2022-02", "finalized", "49.01"), ("2022-01", "finalized", "42.68")]
    assert drafts.json() == {"invoices": []}
    assert own.status_code == 200 and own.json() == {"invoices": []}
    assert other.status_code == 403
    assert other.headers["content-type"] == "application/problem+json"
    assert anonymous.status_code == 401
    assert bad_status.status_code == 422 and "status" in bad_status.text
    assert bad_limit.status_code == 422 and "limit" in bad_limit.text
    assert unknown.status_code == 404 and unknown.json()["type"].endswith("unknown-customer")
    # an empty list would read as "no invoices yet" for a misspelt customer
    for reply in unknown_lists:
        assert reply.status_code == 404 and reply.json()["type"].endswith("unknown-customer")
    assert known_notes.status_code == 200 and known_notes.json() == {"credit_notes": []}
