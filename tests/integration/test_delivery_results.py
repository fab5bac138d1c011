"""The sender's results: attempts that finish together are committed together.

``Recorder.record`` returns once its result is committed (the delivery row says so), a
result alone is written at once, and the results that arrive during a write go in the
next one; a write that fails fails every result in it, and none of it is kept (the rows
stay leased and are sent again).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from psycopg_pool import AsyncConnectionPool

from services.billing.notification.channel import Attempt
from services.billing.notification.intake import store
from services.billing.notification.results import Recorder, Result
from tests.webhook_support import alert, new_customer


async def queued(pool: AsyncConnectionPool, tenant: str, count: int) -> list[int]:
    """``count`` email deliveries of new notifications (one intake batch), claimed."""
    customer = await new_customer(pool, tenant)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "UPDATE customers SET email = %s WHERE id = %s", (f"{customer}@x.example", customer)
        )
        notes = [alert(customer, usage=800 + n) for n in range(count)]
        assert len(await store(conn, notes, mail=True)) == count
        # Claimed, as the sender's are, for a day: no notifier of another test mails them.
        cur = await conn.execute(
            "UPDATE notification_deliveries d SET state = 'sending',"
            " leased_until = now() + interval '1 day' FROM notifications n"
            " WHERE n.id = d.notification_id AND n.customer_id = %s RETURNING d.id",
            (customer,),
        )
        return sorted(row[0] for row in await cur.fetchall())


def ok(delivery: int) -> Result:
    return Result(delivery, Attempt(True, 250, "ok", None, 3), "succeeded", None, None)


async def states(pool: AsyncConnectionPool, ids: list[int]) -> list[tuple[str, int, int]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT d.state, d.attempts, (SELECT count(*) FROM delivery_attempts a"
            " WHERE a.delivery_id = d.id) FROM notification_deliveries d"
            " WHERE d.id = ANY(%s) ORDER BY d.id",
            (ids,),
        )
        return [tuple(row) for row in await cur.fetchall()]


async def test_a_result_is_committed_when_record_returns(
    pool: AsyncConnectionPool, tenant: str
) -> None:
    ids = await queued(pool, tenant, 12)
    recorder = Recorder(pool)
    try:
        await recorder.record(ok(ids[0]))  # alone: written at once
        assert await states(pool, ids[:1]) == [("succeeded", 1, 1)]
        failed = Attempt(False, 500, "no", None, 2)
        retry = Result(ids[1], failed, "pending", timedelta(days=1), None)
        await asyncio.gather(recorder.record(retry), *(recorder.record(ok(i)) for i in ids[2:]))
        assert await states(pool, ids[1:]) == [("pending", 1, 1)] + [("succeeded", 1, 1)] * 10
    finally:
        await recorder.close()


async def test_a_failed_write_fails_every_result_in_it_and_keeps_none(
    pool: AsyncConnectionPool, tenant: str
) -> None:
    ids = await queued(pool, tenant, 3)
    recorder = Recorder(pool)
    try:
        missing = ok(-1)  # no such delivery: its attempt breaks the foreign key
        # recorded together (the three wait while the first write starts): one write
        found = await asyncio.gather(
            *(recorder.record(r) for r in (ok(ids[0]), missing, ok(ids[1]))),
            return_exceptions=True,
        )
        assert all(isinstance(e, Exception) for e in found), found
        assert await states(pool, ids[:2]) == [("sending", 0, 0)] * 2  # still leased
        await recorder.record(ok(ids[2]))  # the next write is a new one
        assert await states(pool, ids[2:]) == [("succeeded", 1, 1)]
    finally:
        await recorder.close()
