"""Copying accounts from PostgreSQL into Redis, where the enforcement script reads them.

PostgreSQL stays the truth; Redis holds a projection the hot path can read in the same
atomic call that decides.  Every change re-projects the customers it touches right
after its transaction commits, so the very next decision sees it: there is no cache to
go stale.  A customer missing from Redis (a flushed or new Redis) is projected on
demand by the first decision that misses it.  Writers of one customer's copy take turns
(``projection_lock``), so a stale copy never lands on top of a fresh one.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from schemas import account_state, redis_keys
from schemas.account_state import compile_plan, epoch_ms
from schemas.zones import zone_info
from services.api.accounts import store as accounts
from services.api.accounts.projection_lock import lock_projection
from services.common import catalog
from services.common.logging import get_logger
from services.common.redis import UNREACHABLE
from services.common.waits import surviving

log = get_logger("tally.accounts")

Fields = dict[FieldT, EncodableT]
"""A Redis hash's fields, as redis-py types them."""


async def project(redis: Redis, conn: AsyncConnection, customer_id: str) -> bool:
    """Write one customer's account and keys to Redis; ``False`` if there is no such
    customer (whatever Redis held for it is removed)."""
    async with conn.transaction():
        await lock_projection(conn, customer_id)
        account, keys, billing_zone = await _read(conn, customer_id)
        account_key, keys_key = redis_keys.account(customer_id), redis_keys.api_keys(customer_id)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(account_key, keys_key)
            if account:
                pipe.hset(account_key, mapping=account)
            if keys:
                pipe.hset(keys_key, mapping=keys)
            await pipe.execute()
        await _project_zones(redis, {customer_id: billing_zone})
    return account is not None


async def _read(
    conn: AsyncConnection, customer_id: str
) -> tuple[Fields | None, Fields, str | None]:
    """The account hash and each key's state, as the enforcement script reads them, and
    the customer's billing zone (None: UTC, or no such customer)."""
    customer = await accounts.get_customer(conn, customer_id)
    if customer is None:
        return None, {}, None
    plan = await catalog.read_plan(conn, customer.plan)
    assert plan is not None, "customers.plan_id references plans"
    trial_ends = customer.trial_ends_at
    past_due = customer.status is accounts.Status.PAST_DUE
    account: Fields = {
        account_state.PLAN: plan.id,
        account_state.STATUS: customer.status.value,
        account_state.TRIAL_ENDS: epoch_ms(trial_ends) if trial_ends else "",
        account_state.POLICIES: compile_plan(plan),
        account_state.PAST_DUE_SINCE: epoch_ms(customer.status_since) if past_due else "",
    }
    keys: Fields = {
        k.id: orjson.dumps(k.holder().state()) for k in await accounts.list_keys(conn, customer.id)
    }
    return account, keys, _zone_name(customer.timezone)


def _zone_name(name: str) -> str | None:
    tz = zone_info(name)
    return None if tz.key == "UTC" else tz.key


async def _project_zones(redis: Redis, wanted: dict[str, str | None]) -> None:
    """Make ``redis_keys.ZONES`` hold ``wanted`` (customer → zone, None: UTC) and bump
    its version when anything changed, so that the processes holding zones reload."""
    customers = list(wanted)
    held = await redis.hmget(redis_keys.ZONES, customers) if customers else []
    changed = {
        c: z
        for c, z, h in zip(customers, wanted.values(), held, strict=True)
        if (_text(h) if h else None) != z
    }
    if not changed:
        return
    async with redis.pipeline(transaction=True) as pipe:
        if gone := [c for c, z in changed.items() if z is None]:
            pipe.hdel(redis_keys.ZONES, *gone)
        if kept := Fields({c: z for c, z in changed.items() if z is not None}):
            pipe.hset(redis_keys.ZONES, mapping=kept)
        pipe.set(redis_keys.ZONES_VERSION, time.time_ns())  # never one seen before a flush
        await pipe.execute()


async def keep_zones_synced(redis: Redis, pool: AsyncConnectionPool) -> None:
    """``sync_zones`` at start, and again every ``RESYNC_SECONDS`` until it succeeds: a
    process started while Redis was away projects the zones once Redis answers."""
    while True:
        with surviving(log, "billing zones not projected yet", *UNREACHABLE, level="warning"):
            await sync_zones(redis, pool)
            return
        await asyncio.sleep(RESYNC_SECONDS)


RESYNC_SECONDS = 5.0


async def sync_zones(redis: Redis, pool: AsyncConnectionPool) -> None:
    """Project every customer's billing zone (a flushed Redis, or zones set while no api
    process ran)."""
    async with pool.connection() as conn:
        billed = {c: _zone_name(tz) for c, tz in await accounts.zones(conn)}
    held = await redis.hkeys(redis_keys.ZONES)
    wanted: dict[str, str | None] = {_text(c): None for c in held}
    await _project_zones(redis, wanted | {c: z for c, z in billed.items() if z is not None})


async def project_customer(redis: Redis, pool: AsyncConnectionPool, customer_id: str) -> bool:
    """``project`` on a connection of its own."""
    async with pool.connection() as conn:
        return await project(redis, conn, customer_id)


async def project_plan(redis: Redis, pool: AsyncConnectionPool, plan_id: str) -> int:
    """Re-project every customer on a plan that just changed."""
    async with pool.connection() as conn:
        customers = await accounts.customers_on(conn, plan_id)
        await conn.commit()  # each projection then commits, and unlocks, on its own
        for customer in customers:
            await project(redis, conn, customer)
    return len(customers)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
