"""The lifecycle scan: what is told because time passed, not because something happened.

Every ``TALLY_LIFECYCLE_INTERVAL_SECONDS`` the billing service looks, read-only, at

- ``customers``: a trial ending within ``TALLY_TRIAL_ENDING_DAYS`` (3) →
  ``trial.ending``, id (customer, trial end): a trial extended to a new end is told
  again, a trial already over is not told;
- ``api_keys``: a key, neither revoked nor replaced by a rotation, expiring within
  ``TALLY_KEY_EXPIRING_DAYS`` (7) → ``api_key.expiring``, id (customer, key, expiry);
  an already expired key is not told;
- ``invoices`` finalized in the last ``LOOK_BACK``: ``invoice.finalized`` again, by
  its stable id, for any the billing run lost between its commit and its publish;
- ``subscription_history``: plan changes of the last two days, ``plan.changed`` again by
  the id their immediate publish used (``plan_changes``).

Each is published with ``publish_once`` (a marker and the XADD in one Redis script), so
every pass, and every billing process, puts each id on the stream once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.events import utcnow
from schemas.notifications import Notification, NotificationType, moment
from services.billing.invoicing import finalized
from services.billing.notification import plan_changes
from services.common.notify import publish_once

LOOK_BACK = timedelta(days=7)
REMEMBER = timedelta(days=45)

_TRIALS = (
    "SELECT id, plan_id, trial_ends_at FROM customers"
    " WHERE status = 'trial' AND trial_ends_at > %s AND trial_ends_at <= %s ORDER BY id"
)
_KEYS = (
    "SELECT id, customer_id, name, expires_at FROM api_keys"
    " WHERE revoked_at IS NULL AND replaced_by IS NULL"
    " AND expires_at > %s AND expires_at <= %s ORDER BY id"
)


@dataclass(frozen=True, slots=True)
class Report:
    trials: int
    keys: int
    invoices: int
    plans: int = 0


class LifecycleScan:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        redis: Redis,
        trial_ahead: timedelta,
        key_ahead: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._trial_ahead = trial_ahead
        self._key_ahead = key_ahead
        self._clock = clock

    async def run(self) -> Report:
        """One pass; what it published now (not what earlier passes did)."""
        now = self._clock()
        async with self._pool.connection() as conn:
            trials = await _trials(conn, now, now + self._trial_ahead)
            keys = await _keys(conn, now, now + self._key_ahead)
            invoices = await finalized.finalized_since(conn, now - LOOK_BACK)
            plans = await plan_changes.recent(conn, now - plan_changes.WINDOW)
        told = [await self._once(note) for note in [*trials, *keys]]
        return Report(
            trials=sum(told[: len(trials)]),
            keys=sum(told[len(trials) :]),
            invoices=await finalized.tell(self._redis, invoices),
            plans=sum([await self._once(note, plan_changes.REMEMBER) for note in plans]),
        )

    async def _once(self, note: Notification, remember: timedelta = REMEMBER) -> int:
        return int(await publish_once(self._redis, note, remember))


async def _trials(conn: AsyncConnection, now: datetime, until: datetime) -> list[Notification]:
    cur = await conn.execute(_TRIALS, (now, until))
    kind = NotificationType.TRIAL_ENDING
    return [
        Notification.decided(
            kind, customer, (moment(ends),), now, {"plan": plan, "trial_ends_at": moment(ends)}
        )
        for customer, plan, ends in await cur.fetchall()
    ]


async def _keys(conn: AsyncConnection, now: datetime, until: datetime) -> list[Notification]:
    cur = await conn.execute(_KEYS, (now, until))
    kind = NotificationType.API_KEY_EXPIRING
    return [
        Notification.decided(
            kind,
            customer,
            (key, moment(expires)),
            now,
            {
                "key_id": key,
                "name": name,
                "expires_at": moment(expires),
            },
        )
        for key, customer, name, expires in await cur.fetchall()
    ]
