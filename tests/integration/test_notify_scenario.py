"""The delivery half of the brief's scenario, through the notifier billing starts (its
SMTP mailer included): a free customer's alerts at 800, 900 and 1,000 calls, as the
aggregator publishes them, reach its endpoint as exactly one verified webhook each and
its inbox as exactly one email each — duplicates and replays of the same alerts included.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import httpx
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from standardwebhooks import Webhook

from schemas.alerts import PLAN_RULE, AlertKind, Crossing, Threshold
from schemas.events import to_micros
from schemas.notifications import STREAM, Notification
from services.aggregator.alerts import notification
from services.billing.notification.email.mailer import build_mailer
from services.billing.service import notify
from services.common.notify import publish
from services.common.settings import Settings
from services.runtime import Component, Runtime, http_app
from tests.webhook_support import (
    add_endpoint,
    eventually,
    new_customer,
    quick,
    receiver,
    smtp_inbox,
)


def crossed(customer: str, percent: int) -> Notification:
    month = f"{datetime.now(UTC):%Y%m}"
    at = to_micros(Decimal(percent * 10))
    threshold = Threshold(at, AlertKind.PERCENT, Decimal(percent), PLAN_RULE, Decimal(1000))
    return notification(customer, Crossing("api_calls", month, at, threshold), None)


async def test_one_webhook_and_one_email_per_alert(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, tenant: str
) -> None:
    customer = await new_customer(pool, tenant)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE customers SET company = 'Acme Rockets' WHERE id = %s", (customer,)
        )
    await redis.delete(STREAM)
    async with smtp_inbox() as inbox, receiver() as rx:
        settings = quick(settings, smtp_url=f"smtp://127.0.0.1:{inbox.port}?starttls=false")
        async with Runtime(settings) as runtime:
            made = await notify(runtime, build_mailer(settings))
            app = http_app([Component("billing", routers=made.routers)])
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                secret = (await add_endpoint(client, rx.url("/ok/brief"), customer))["secret"]
            alerts = [crossed(customer, p) for p in (80, 90, 100)]
            for alert in alerts:
                await publish(redis, alert)
                await publish(redis, alert)  # a duplicate (a retried publish)
            got = await rx.wait_for("/ok/brief", 3)
            for alert in alerts:  # a replay, after delivery
                await publish(redis, alert)
            await eventually(lambda: len(inbox.messages) >= 3)
            await asyncio.sleep(1.0)  # time for anything extra to show

    assert len(rx.at("/ok/brief")) == 3
    bodies = [Webhook(secret).verify(g.body, g.headers) for g in got]
    assert sorted(b["data"]["threshold"]["value"] for b in bodies) == ["100", "80", "90"]
    assert sorted(g.headers["webhook-id"] for g in got) == sorted(a.id for a in alerts)
    assert len(inbox.messages) == 3
    assert all(to == [f"{customer}@example.com"] for to, _ in inbox.messages)
    assert all(b"Acme Rockets" in content for _, content in inbox.messages)  # greeted by name
