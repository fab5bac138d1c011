"""When a customer's alert levels are recompiled: a plan change (the notifier's
``plan.changed``), the safety-net pass over everyone, and a catalog change (PostgreSQL's
``tally_catalog`` notification, which billing's recompile loop waits on)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.alerts import decode
from schemas.catalog import Catalog
from schemas.events import VALUE_SCALE
from schemas.notifications import Notification, NotificationType, notification_id
from schemas.plans import AlertDefaults
from services.api.catalog.store import save_plan
from services.billing.notification.alerts.compile import AlertCompiler
from services.common.meter_cache import MeterCache
from services.common.settings import Settings
from tests.accounts_support import ADMIN, running_api, sign_up


async def levels(redis: Redis, customer: str) -> list[Decimal]:
    raw: Any = await redis.hget(redis_keys.alerts(customer), "api_calls")
    return [Decimal(t.quantity) / VALUE_SCALE for t in decode(raw.decode())] if raw else []


def plan_changed(customer: str) -> Notification:
    return Notification(
        id=notification_id(NotificationType.PLAN_CHANGED, customer, "test"),
        type=NotificationType.PLAN_CHANGED,
        customer=customer,
        occurred_at=datetime.now(UTC),
        data={"customer": customer, "from_plan": "free", "to_plan": "starter", "source": "admin"},
    )


async def test_a_plan_change_recompiles_the_customer(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis
) -> None:
    compiler = AlertCompiler(pool, redis)
    async with running_api(settings) as api:
        account = await sign_up(api, "free")
        assert await compiler.customer(account.customer)
        assert await levels(redis, account.customer) == [800, 900, 1000]
        change = await api.patch(
            f"/v1/admin/customers/{account.customer}", json={"plan": "starter"}, headers=ADMIN
        )
        assert change.status_code == 200, change.text
    other = plan_changed(account.customer).model_copy(update={"type": "trial.ending"})
    await compiler.on_notification(other)
    assert await levels(redis, account.customer) == [800, 900, 1000]  # not a plan change
    await compiler.on_notification(plan_changed(account.customer))
    assert await levels(redis, account.customer) == [40_000, 45_000, 50_000]
    assert await compiler.customer("no-such-customer") is None


async def test_the_safety_net_recompiles_everyone(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis
) -> None:
    async with running_api(settings) as api:
        accounts = [await sign_up(api, "free") for _ in range(3)]
    for account in accounts:
        await redis.delete(redis_keys.alerts(account.customer))
    assert await AlertCompiler(pool, redis).everyone() >= 3
    for account in accounts:
        assert await levels(redis, account.customer) == [800, 900, 1000]


async def test_a_catalog_change_tells_the_watchers(
    settings: Settings, pool: AsyncConnectionPool, tenant: str
) -> None:
    cache = MeterCache(pool, settings.database_url, max_age=30)
    told = asyncio.Event()

    async def watcher() -> None:
        told.set()

    cache.on_change(watcher)
    await cache.start()
    try:
        async with asyncio.timeout(10):
            while not cache.listening:  # noqa: ASYNC110 (a flag, no event to wait on)
                await asyncio.sleep(0.05)
        free = next(p for p in Catalog.default().plans if p.id == "free")
        copy = free.model_copy(
            update={"id": f"{tenant}-plan", "upgrade_to": None, "alerts": AlertDefaults()}
        )
        async with pool.connection() as conn:
            await save_plan(conn, copy, "test")
        async with asyncio.timeout(10):
            await told.wait()
    finally:
        await cache.stop()
