"""Customers with a past, and usage on given days, written straight into PostgreSQL;
the billing service's Stripe routes as an HTTP client."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool

from schemas.invoices import Invoice
from services.billing.invoicing import reader as invoices
from services.billing.stripe import routes as stripe_routes
from services.billing.stripe.sessions import Sessions
from services.billing.stripe.webhooks import Webhooks
from services.common.auth import Authenticator
from services.runtime import Component, http_app

WEBHOOK_SECRET = "whsec_test"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def subscribe(
    pool: AsyncConnectionPool,
    customer: str,
    plan: str,
    since: datetime,
    status: str = "active",
    trial_ends_at: datetime | None = None,
    timezone: str = "UTC",
) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO customers (id, email, plan_id, status, trial_ends_at, created_at,"
            " timezone) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (customer, f"{customer}@example.com", plan, status, trial_ends_at, since, timezone),
        )


async def change(
    pool: AsyncConnectionPool,
    customer: str,
    when: datetime,
    plan: str | None = None,
    status: str | None = None,
) -> None:
    """Change plan or status as of ``when`` (the trigger records it; we back-date it)."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE customers SET plan_id = coalesce(%s, plan_id), status = coalesce(%s, status)"
            " WHERE id = %s",
            (plan, status, customer),
        )
        await conn.execute(
            "UPDATE subscription_history SET at = %s WHERE customer_id = %s AND seq ="
            " (SELECT max(seq) FROM subscription_history WHERE customer_id = %s)",
            (when, customer, customer),
        )


async def record_usage(
    pool: AsyncConnectionPool, customer: str, meter: str, day: date, value: Decimal | int | str
) -> None:
    """A day's rolled-up usage, as the rollup would write it."""
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO usage_daily (customer, meter, day, value, latest_at, watermark)"
            " VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (customer, meter, day, group_key)"
            " DO UPDATE SET value = excluded.value, latest_at = excluded.latest_at,"
            " watermark = excluded.watermark",
            (customer, meter, day, Decimal(value), datetime.combine(day, datetime.max.time(), UTC)),
        )


async def invoice_of(pool: AsyncConnectionPool, customer: str) -> Invoice:
    async with pool.connection() as conn:
        [invoice] = await invoices.listed(conn, customer)
    return invoice


def amounts(invoice: Invoice) -> list[tuple[str | None, Decimal]]:
    return [(line.meter or line.plan, line.amount) for line in invoice.lines]


def stripe_app(settings: Any, pool: Any, redis: Any, api: Any) -> httpx.AsyncClient:
    """The billing service's Stripe routes, on ``api`` (None: Stripe not configured)."""
    hooks = Webhooks(pool, redis, WEBHOOK_SECRET, "free")
    router = stripe_routes.router(Authenticator(settings, redis, pool), Sessions(pool, api), hooks)
    app = http_app([Component("billing", routers=[router])])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")
