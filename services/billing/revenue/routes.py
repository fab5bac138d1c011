"""The revenue view as JSON, for the seller (the admin token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.events import utcnow
from schemas.revenue import MAX_MONTHS, Revenue
from services.billing.revenue import report
from services.common.auth import Authenticator, address, credential
from services.common.openapi import problem_responses

Months = Annotated[
    int, Query(ge=1, le=MAX_MONTHS, description="Calendar months of history, this one included.")
]


def router(pool: AsyncConnectionPool, redis: Redis, auth: Authenticator) -> APIRouter:
    async def admin(request: Request) -> None:
        """Checked before the parameters: a caller without the token learns nothing."""
        await auth.admin(credential(request), address(request))

    api = APIRouter(
        tags=["admin"],
        dependencies=[Depends(admin)],
        responses=problem_responses(401, 422, 429, 503),
    )

    @api.get(
        "/v1/admin/revenue",
        summary="Committed MRR and its movements, usage revenue, customers, trials, top"
        " customers and the past-due balance",
    )
    async def revenue(months: Months = 12) -> Revenue:
        return await report.build(pool, redis, months, utcnow())

    return api
