"""The admin API for the catalog (admin token): plans as versioned data.

A plan change is a new version, audited, then projected at once into the Redis copy of
every customer on the plan, so enforcement applies it from the very next request.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from schemas.catalog import ADDITIVE
from schemas.plans import Plan, check_plan
from schemas.problem_types import UNKNOWN_PLAN
from services.api.accounts import projection
from services.api.accounts import store as accounts
from services.api.accounts.admin_routes import IdPath, admin_api
from services.api.accounts.service import Accounts
from services.api.catalog import store
from services.api.catalog.history import History, history
from services.common import catalog
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field

ACTOR = "admin"


class CatalogPlan(Plan):
    """A plan of the catalog, with its current version; archived ones too."""

    version: int
    archived: bool


class CatalogPlans(BaseModel):
    plans: list[CatalogPlan]


class SavedPlan(BaseModel):
    plan: Plan
    version: int = Field(description="The version this change created.")
    customers: int = Field(description="Customers on the plan, to whom it applies at once.")


def router(service: Accounts) -> APIRouter:
    api = admin_api(service)
    pool, redis = service.pool, service.redis

    @api.get("/plans", summary="Every plan, with its current version")
    async def list_plans() -> CatalogPlans:
        async with pool.connection() as conn:
            return CatalogPlans.model_validate({"plans": await store.every_plan(conn)})

    @api.put(
        "/plans/{plan_id}",
        summary="Create or replace a plan: a new version, at once",
        responses=problem_responses(422),
    )
    async def put_plan(plan_id: IdPath, plan: Plan) -> SavedPlan:
        if plan.id != plan_id:
            raise invalid_field(
                "body.id", f"the body's id {plan.id!r} differs from the path's {plan_id!r}"
            )
        async with pool.connection() as conn:
            meters = await catalog.meters(conn)
            plans = {p.id for p in await catalog.read_plans(conn)} | {plan.id}
            try:
                check_plan(
                    plan,
                    {m.name for m in meters},
                    {m.name for m in meters if m.aggregation in ADDITIVE},
                    plans,
                )
            except ValueError as exc:
                raise invalid_field("body", str(exc)) from None
            version = await store.save_plan(conn, plan, ACTOR)
            await accounts.audit(conn, ACTOR, "plan.saved", plan.id, version=version)
        moved = await projection.project_plan(redis, pool, plan.id)
        return SavedPlan(plan=plan, version=version, customers=moved)

    @api.get(
        "/plans/{plan_id}/versions",
        summary="A plan's history: who changed what, when",
        responses=problem_responses(404, 422),
    )
    async def plan_versions(plan_id: IdPath) -> History:
        async with pool.connection() as conn:
            rows = await store.versions(conn, plan_id)
        if not rows:
            raise Problem(UNKNOWN_PLAN, f"no plan {plan_id!r}")
        return history(rows)

    return api
