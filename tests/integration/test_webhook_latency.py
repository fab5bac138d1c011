"""The notifier as billing's service starts it, under load: every notification reaches
its endpoint, p99 of publish → webhook received under 2 s."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from standardwebhooks import Webhook

from schemas.notifications import STREAM
from services.billing.service import notify
from services.common.notify import publish
from services.common.settings import Settings
from services.runtime import Component, Runtime, http_app
from tests.webhook_support import add_endpoint, alert, eventually, new_customer, quick, receiver

CUSTOMERS = 50
PER_CUSTOMER = 6  # 300 notifications
RATE = 200  # published per second


async def test_event_to_webhook_latency_through_the_service(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, tenant: str
) -> None:
    settings = quick(settings)
    await redis.delete(STREAM)
    customers = [await new_customer(pool, tenant) for _ in range(CUSTOMERS)]
    async with receiver() as rx, Runtime(settings) as runtime:
        made = await notify(runtime)
        app = http_app([Component("billing", routers=made.routers)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            secrets = {
                c_id: (await add_endpoint(c, rx.url(f"/ok/{c_id}"), c_id))["secret"]
                for c_id in customers
            }
        histogram = "tally_notification_delivery_seconds_count"
        observed = REGISTRY.get_sample_value(histogram, {"channel": "webhook"}) or 0.0
        published: dict[str, float] = {}
        for round_ in range(PER_CUSTOMER):
            for customer in customers:
                n = alert(customer, usage=round_)
                published[n.id] = time.monotonic()
                await publish(redis, n)
                await asyncio.sleep(1 / RATE)
        total = CUSTOMERS * PER_CUSTOMER
        async with rx.arrived:
            await asyncio.wait_for(rx.arrived.wait_for(lambda: len(rx.requests) >= total), 30)
        got = rx.requests
        assert len({r.headers["webhook-id"] for r in got}) == total
        for r in got[:: total // 10]:
            Webhook(secrets[r.path.removeprefix("/ok/")]).verify(r.body, r.headers)
        latencies = sorted(r.at - published[r.headers["webhook-id"]] for r in got)
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"\nlatency, {total} at {RATE}/s: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
        assert p99 < 2.0
        await eventually(
            lambda: REGISTRY.get_sample_value(histogram, {"channel": "webhook"}) == observed + total
        )
        assert REGISTRY.get_sample_value("tally_notification_deliveries_pending") is not None
