"""Tally's api and billing services in one application, as ``tally up`` serves them
(without billing's scheduled jobs), for the customer dashboard's tests; and customers
with usage, invoices, alerts and endpoints to show."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.types import ASGIApp

from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.events import utcnow
from services.api import service as api_service
from services.billing.invoicing import routes as invoice_routes
from services.billing.notification import alert_routes
from services.billing.notification.access import Access
from services.billing.notification.alerts.compile import AlertCompiler
from services.billing.notification.notifier import notifier
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from services.runtime import Component, Runtime, http_app
from tests.accounts_support import ADMIN, customer_on, random_address
from tests.billing_support import record_usage
from tests.integration.test_usage_api import aggregate

SERVICE = {"Authorization": "Bearer test-token"}
ENDPOINTS = {"/v1/search": 30, "/v1/items": 12, "/v1/users": 4, "/v1/orders": 2, "/v1/a": 1}
"""Calls per endpoint this month: 49 in all, a top 5 and one more."""


@asynccontextmanager
async def tally_app(settings: Settings, **overrides: Any) -> AsyncIterator[ASGIApp]:
    """The api service and billing's routes in one process (billing read in-process)."""
    settings = settings.model_copy(update={"admin_token": "test-admin-token", **overrides})
    async with Runtime(settings) as runtime:
        pool, redis, auth = await runtime.pool(), runtime.redis(), await runtime.authenticator()
        billing = Component(
            "billing",
            routers=[
                invoice_routes.router(pool, auth, runtime.clickhouse),
                alert_routes.router(pool, Access(auth), AlertCompiler(pool, redis)),
                *notifier(settings, pool, redis, auth).routers,
            ],
        )
        yield http_app([billing, await api_service.start(runtime)])


def client_of(app: ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app, client=(random_address(), 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def dashboard_plan(fee: str = "49") -> dict[str, Any]:
    """Two quotas and one included allowance (storage, no quota), and two rate limits."""
    return {
        "id": f"p-{uuid.uuid4().hex[:8]}",
        "name": "Dashboard plan",
        "price": fee,
        "prices": {
            "api_calls": {"model": "per_unit", "included": 100, "unit_price": "0.01"},
            "compute_seconds": {"model": "per_unit", "included": 1000, "unit_price": "0.002"},
            "storage_gb": {"model": "per_unit", "included": 100, "unit_price": "0.5"},
        },
        "quotas": {
            "api_calls": {"limit": 98, "enforcement": "hard"},
            "compute_seconds": {"limit": 1000, "enforcement": "soft"},
        },
        "rate_limits": [
            {"name": "per-minute", "limit": 600, "per": "minute"},
            {"name": "search-per-second", "limit": 5, "per": "second", "endpoint": "/v1/search"},
        ],
        "alerts": {"percent": [80, 100]},
    }


async def customer_with_usage(
    api: httpx.AsyncClient,
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    pool: AsyncConnectionPool,
    meters: dict[str, list[Meter]],
    plan: dict[str, Any],
    compute: int = 750,
    storage: int = 95,
) -> tuple[str, dict[str, str]]:
    """A customer on ``plan`` with 49 calls this month (of a 98 quota: 50 %), ``compute``
    seconds (of 1,000: 75 %) and ``storage`` GB at peak (of 100 included: 95 %); counted
    by the aggregator into Redis, and rolled up for billing."""
    customer, key = await customer_on(api, plan)
    now = utcnow()
    events = [
        StoredEvent(
            f"{customer}{endpoint}{i}",
            "src",
            "api_call",
            customer,
            now,
            Decimal(1),
            {"endpoint": endpoint},
            now,
        )
        for endpoint, calls in ENDPOINTS.items()
        for i in range(calls)
    ]
    events.append(
        StoredEvent(
            f"{customer}-compute", "src", "compute", customer, now, Decimal(compute), {}, now
        )
    )
    await aggregate(settings, ch, redis, meters, events)
    today = now.date()
    await record_usage(pool, customer, "api_calls", today, sum(ENDPOINTS.values()))
    await record_usage(pool, customer, "compute_seconds", today, compute)
    await record_usage(pool, customer, "storage_gb", today, storage)
    return customer, key


async def past_invoice(pool: AsyncConnectionPool, customer: str, period: str, total: str) -> str:
    """A finalized invoice for an earlier month, as billing would have stored it."""
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    invoice_id = f"inv_{uuid.uuid4().hex[:16]}"
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO invoices (id, customer_id, period, period_start, period_end, status,"
            " currency, lines, subtotal, total, finalized_at)"
            " VALUES (%s, %s, %s, %s, %s, 'finalized', 'usd', '[]', %s, %s, now())",
            (invoice_id, customer, period, start, end, Decimal(total), Decimal(total)),
        )
    return invoice_id


async def mint(
    api: httpx.AsyncClient, customer: str, headers: dict[str, str] = ADMIN, **body: Any
) -> httpx.Response:
    return await api.post(f"/v1/customers/{customer}/portal-tokens", json=body, headers=headers)


async def open_portal(api: httpx.AsyncClient, customer: str, **body: Any) -> httpx.Response:
    """Mint a link, follow it (the 303 sets the session), and fetch the dashboard."""
    minted = await mint(api, customer, **body)
    assert minted.status_code == 201, minted.text
    link = minted.json()["url"].removeprefix(str(api.base_url).rstrip("/"))
    link = re.sub(r"^https?://[^/]+", "", link)
    entered = await api.get(link)
    assert entered.status_code == 303, entered.text
    assert entered.headers["location"] == "/portal"
    page = await api.get("/portal")
    assert page.status_code == 200, page.text
    return page
