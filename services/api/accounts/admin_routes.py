"""The admin API (admin token): plans as versioned data, customers, their keys, the audit.

Every change is written to PostgreSQL with an audit entry, then projected into Redis
before the response, so enforcement applies it from the very next request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, EmailStr, Field

from schemas.catalog import ADDITIVE
from schemas.events import CUSTOMER_ID_PATTERN
from schemas.plans import Plan, check_plan
from schemas.problem_types import CUSTOMER_EXISTS, UNKNOWN_PLAN
from services.api.accounts import projection
from services.api.accounts import store as accounts
from services.api.accounts.service import (
    Accounts,
    IssuedKey,
    NewKeyRequest,
    OpenedAccount,
    RotatedKey,
    Rotation,
)
from services.api.accounts.store import ApiKey, Customer, Status
from services.common import catalog
from services.common.auth import address, credential
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field

ACTOR = "admin"


class NewCustomer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str | None, Field(pattern=CUSTOMER_ID_PATTERN)] = Field(
        None, description="Your own id for the customer (the events' subject); default cus_…"
    )
    email: EmailStr
    company: Annotated[str, Field(max_length=200)] = ""
    plan: str = "free"
    issue_key: bool = True


class CustomerChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = None
    status: Status | None = None


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


class PlanVersion(BaseModel):
    version: int
    definition: dict[str, Any] = Field(description="The plan as it was saved (a Plan).")
    changed_by: str
    changed_at: datetime


class PlanHistory(BaseModel):
    versions: list[PlanVersion]


class CustomerList(BaseModel):
    customers: list[Customer]


class CustomerDetail(BaseModel):
    customer: Customer
    keys: list[ApiKey]


class AuditEntry(BaseModel):
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


class AuditLog(BaseModel):
    entries: list[AuditEntry]


def router(service: Accounts) -> APIRouter:
    async def admin(request: Request) -> None:
        await service.auth.admin(credential(request), address(request))

    api = APIRouter(
        prefix="/v1/admin",
        tags=["admin"],
        dependencies=[Depends(admin)],
        responses=problem_responses(401, 429, 503),
    )
    pool, redis = service.pool, service.redis

    @api.get("/plans", summary="Every plan, with its current version")
    async def list_plans() -> CatalogPlans:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT definition, version, archived FROM plans ORDER BY id")
            rows = await cur.fetchall()
        return CatalogPlans.model_validate(
            {"plans": [d | {"version": v, "archived": a} for d, v, a in rows]}
        )

    @api.put(
        "/plans/{plan_id}",
        summary="Create or replace a plan: a new version, at once",
        responses=problem_responses(422),
    )
    async def put_plan(plan_id: str, plan: Plan) -> SavedPlan:
        if plan.id != plan_id:
            raise invalid_field(
                "id", f"the body's id {plan.id!r} differs from the path's {plan_id!r}"
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
                raise invalid_field("plan", str(exc)) from None
            version = await catalog.save_plan(conn, plan, ACTOR)
            await accounts.audit(conn, ACTOR, "plan.saved", plan.id, version=version)
        moved = await projection.project_plan(redis, pool, plan.id)
        return SavedPlan(plan=plan, version=version, customers=moved)

    @api.get(
        "/plans/{plan_id}/versions",
        summary="A plan's history: who changed what, when",
        responses=problem_responses(404, 422),
    )
    async def plan_versions(plan_id: str) -> PlanHistory:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT version, definition, changed_by, changed_at FROM plan_versions"
                " WHERE plan_id = %s ORDER BY version",
                (plan_id,),
            )
            rows = await cur.fetchall()
        if not rows:
            raise Problem(UNKNOWN_PLAN, f"no plan {plan_id!r}")
        return PlanHistory(
            versions=[
                PlanVersion(version=v, definition=d, changed_by=by, changed_at=at)
                for v, d, by, at in rows
            ]
        )

    @api.get(
        "/customers",
        summary="Customers, by id, a page at a time",
        responses=problem_responses(422),
    )
    async def list_customers(
        plan: str | None = None,
        after: str = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> CustomerList:
        async with pool.connection() as conn:
            found = await accounts.list_customers(conn, plan=plan, limit=limit, after=after)
        return CustomerList(customers=found)

    @api.post(
        "/customers",
        status_code=201,
        summary="Create a customer (and a first key)",
        responses=problem_responses(409, 422),
    )
    async def create_customer(body: NewCustomer) -> OpenedAccount:
        plan = await service.plan(body.plan)
        if body.id:
            async with pool.connection() as conn:
                if await accounts.get_customer(conn, body.id):
                    raise Problem(CUSTOMER_EXISTS, f"{body.id!r} exists")
        return await service.open_account(
            body.email, body.company, plan, ACTOR, customer_id=body.id, with_key=body.issue_key
        )

    @api.get(
        "/customers/{customer_id}",
        summary="One customer and its keys",
        responses=problem_responses(404, 422),
    )
    async def get_customer(customer_id: str) -> CustomerDetail:
        customer = await service.customer(customer_id)
        async with pool.connection() as conn:
            keys = await accounts.list_keys(conn, customer_id)
        return CustomerDetail(customer=customer, keys=keys)

    @api.patch(
        "/customers/{customer_id}",
        summary="Change plan or status; applies at once",
        responses=problem_responses(404, 422),
    )
    async def change_customer(customer_id: str, body: CustomerChange) -> Customer:
        await service.customer(customer_id)
        plan = await service.plan(body.plan) if body.plan else None
        async with pool.connection() as conn:
            if plan is not None:
                await accounts.change_plan(conn, customer_id, plan, ACTOR)
            if body.status is not None:
                await accounts.set_status(conn, customer_id, body.status, ACTOR)
        await service.reproject(customer_id)
        return await service.customer(customer_id)

    @api.post(
        "/customers/{customer_id}/keys",
        status_code=201,
        summary="Issue a key",
        responses=problem_responses(404, 422),
    )
    async def new_key(customer_id: str, body: NewKeyRequest) -> IssuedKey:
        await service.customer(customer_id)
        return await service.new_key(customer_id, body, ACTOR, grantor=None)

    @api.post(
        "/customers/{customer_id}/keys/{key_id}/rotate",
        status_code=201,
        responses=problem_responses(404, 409, 422),
    )
    async def rotate_key(customer_id: str, key_id: str, body: Rotation) -> RotatedKey:
        key = await service.key(customer_id, key_id)
        return await service.rotate(key, body, ACTOR, grantor=None)

    @api.delete(
        "/customers/{customer_id}/keys/{key_id}",
        status_code=204,
        responses=problem_responses(404, 422),
    )
    async def revoke_key(customer_id: str, key_id: str) -> None:
        await service.revoke(await service.key(customer_id, key_id), ACTOR)

    @api.get(
        "/audit",
        summary="The audit log, newest first",
        responses=problem_responses(422),
    )
    async def audit_log(
        subject: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AuditLog:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT at, actor, action, subject, detail FROM audit_log"
                " WHERE %s::text IS NULL OR subject = %s ORDER BY id DESC LIMIT %s",
                (subject, subject, limit),
            )
            rows = await cur.fetchall()
        keys = ("at", "actor", "action", "subject", "detail")
        return AuditLog.model_validate(
            {"entries": [dict(zip(keys, row, strict=True)) for row in rows]}
        )

    return api
