"""A plan change whose ``plan.changed`` a crash lost is re-told by billing's lifecycle
pass from ``subscription_history``, once, under the id the immediate publish uses; one
told at once is never told again."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.notifications import STREAM, NotificationType, moment, notification_id
from services.api.accounts import store
from services.billing.notification.lifecycle import LifecycleScan
from services.common.catalog import read_plan
from services.common.settings import Settings
from tests.accounts_support import ADMIN, running_api, sign_up


async def told(redis: Redis, customer: str) -> list[dict[str, Any]]:
    entries: Any = await redis.xrange(STREAM)
    notes = [orjson.loads(fields[b"n"]) for _, fields in entries]
    return [
        n for n in notes if n["type"] == NotificationType.PLAN_CHANGED and n["customer"] == customer
    ]


def scan(pool: AsyncConnectionPool, redis: Redis) -> LifecycleScan:
    return LifecycleScan(pool, redis, timedelta(days=3), timedelta(days=7))


async def test_a_change_told_at_once_is_not_told_again(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis
) -> None:
    async with running_api(settings) as api:
        account = await sign_up(api, "free")
        reply = await api.patch(
            f"/v1/admin/customers/{account.customer}", json={"plan": "starter"}, headers=ADMIN
        )
        assert reply.status_code == 200, reply.text
    [at_once] = await told(redis, account.customer)
    await scan(pool, redis).run()
    await scan(pool, redis).run()
    assert await told(redis, account.customer) == [at_once]


async def test_changes_lost_between_commit_and_publish_are_told_once(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis
) -> None:
    async with running_api(settings) as api:
        admin_changed = await sign_up(api, "free")
        stripe_changed = await sign_up(api, "free")
        status_only = await sign_up(api, "free")
    async with pool.connection() as conn:  # each commits, then "crashes": no publish
        starter = await read_plan(conn, "starter")
        assert starter is not None
        changed = await store.change_plan(conn, admin_changed.customer, starter, "admin")
        await store.sync_plan_and_status(
            conn, stripe_changed.customer, "pro", None, "stripe", change="evt_lost"
        )
        await store.set_status(conn, status_only.customer, store.Status.PAST_DUE, "admin")
    assert changed is not None
    _, at = changed
    assert (await scan(pool, redis).run()).plans >= 2
    assert (await scan(pool, redis).run()).plans == 0

    [admin_note] = await told(redis, admin_changed.customer)
    assert admin_note["data"] == {
        "customer": admin_changed.customer,
        "from_plan": "free",
        "to_plan": "starter",
        "source": "admin",
    }
    assert admin_note["id"] == notification_id(  # the id the admin route derives
        NotificationType.PLAN_CHANGED, admin_changed.customer, moment(at)
    )
    [stripe_note] = await told(redis, stripe_changed.customer)
    assert stripe_note["id"] == notification_id(
        NotificationType.PLAN_CHANGED, stripe_changed.customer, "evt_lost"
    )
    assert (stripe_note["data"]["source"], stripe_note["data"]["to_plan"]) == ("stripe", "pro")
    assert await told(redis, status_only.customer) == []
