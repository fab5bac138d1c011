"""A trial that ran out unpaid ends where it is noticed: at the customer's next decision,
or the next read of its limits, so that both count with the plan it is really on now."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.events import utcnow
from services.api.accounts import projection, service
from services.api.accounts import store as accounts
from services.common import catalog
from services.common.settings import Settings


async def end_trial(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool, customer: str
) -> None:
    """Downgrade (``TALLY_TRIAL_EXPIRY=downgrade``) or suspend, then re-project: a no-op
    for a trial another caller ended first."""
    async with pool.connection() as conn:
        plan = None
        if settings.trial_expiry == "downgrade":
            plan = await catalog.read_plan(conn, settings.downgrade_plan)
        before = await accounts.end_trial(conn, customer, plan, "system:trial-expiry")
        await conn.commit()
        await projection.project(redis, conn, customer)
    if before is not None and plan is not None:
        now = utcnow()
        # The trial's end is the change's own id: a trial ends once.
        note = service.plan_changed(customer, before, plan.id, "trial_end", "trial_end", now)
        await service.tell(redis, note)
