"""The admin API (admin token): plans as versioned data, customers, their keys, the audit.

Every change is written to PostgreSQL with an audit entry, then projected into Redis
before the response, so enforcement applies it from the very next request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, EmailStr, Field

from schemas.catalog import ADDITIVE
from schemas.events import CUSTOMER_ID_PATTERN
from schemas.plans import Plan, check_plan
from schemas.problem_types import CUSTOMER_EXISTS, UNKNOWN_PLAN
from services.api.accounts import projection
from services.api.accounts import service as accounts
from services.api.accounts.routes import Accounts, NewKeyRequest, Rotation
from services.api.accounts.service import Customer, Status
from services.common import catalog
from services.common.auth import address, credential
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


def router(service: Accounts) -> APIRouter:
    async def admin(request: Request) -> None:
        await service.auth.admin(credential(request), address(request))

    api = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)])
    pool, redis = service.pool, service.redis

    @api.get("/plans", summary="Every plan, with its current version")
    async def list_plans() -> dict[str, list[dict[str, Any]]]:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT definition, version, archived FROM plans ORDER BY id")
            rows = await cur.fetchall()
        return {"plans": [d | {"version": v, "archived": a} for d, v, a in rows]}

    @api.put("/plans/{plan_id}", summary="Create or replace a plan: a new version, at once")
    async def put_plan(plan_id: str, plan: Plan) -> dict[str, Any]:
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
        return {"plan": plan.model_dump(mode="json"), "version": version, "customers": moved}

    @api.get("/plans/{plan_id}/versions", summary="A plan's history: who changed what, when")
    async def plan_versions(plan_id: str) -> dict[str, list[dict[str, Any]]]:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT version, definition, changed_by, changed_at FROM plan_versions"
                " WHERE plan_id = %s ORDER BY version",
                (plan_id,),
            )
            rows = await cur.fetchall()
        if not rows:
            raise Problem(UNKNOWN_PLAN, f"no plan {plan_id!r}")
        return {
            "versions": [
                {"version": v, "definition": d, "changed_by": by, "changed_at": at}
                for v, d, by, at in rows
            ]
        }

    @api.get("/customers", summary="Customers, by id, a page at a time")
    async def list_customers(
        plan: str | None = None,
        after: str = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, list[Customer]]:
        async with pool.connection() as conn:
            found = await accounts.list_customers(conn, plan=plan, limit=limit, after=after)
        return {"customers": found}

    @api.post("/customers", status_code=201, summary="Create a customer (and a first key)")
    async def create_customer(body: NewCustomer) -> dict[str, Any]:
        plan = await service.plan(body.plan)
        if body.id:
            async with pool.connection() as conn:
                if await accounts.get_customer(conn, body.id):
                    raise Problem(CUSTOMER_EXISTS, f"{body.id!r} exists")
        return await service.open_account(
            body.email, body.company, plan, ACTOR, customer_id=body.id, with_key=body.issue_key
        )

    @api.get("/customers/{customer_id}", summary="One customer and its keys")
    async def get_customer(customer_id: str) -> dict[str, Any]:
        customer = await service.customer(customer_id)
        async with pool.connection() as conn:
            keys = await accounts.list_keys(conn, customer_id)
        return {"customer": customer, "keys": keys}

    @api.patch("/customers/{customer_id}", summary="Change plan or status; applies at once")
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

    @api.post("/customers/{customer_id}/keys", status_code=201, summary="Issue a key")
    async def new_key(customer_id: str, body: NewKeyRequest) -> dict[str, Any]:
        await service.customer(customer_id)
        return await service.new_key(customer_id, body, ACTOR, grantor=None)

    @api.post("/customers/{customer_id}/keys/{key_id}/rotate", status_code=201)
    async def rotate_key(customer_id: str, key_id: str, body: Rotation) -> dict[str, Any]:
        key = await service.key(customer_id, key_id)
        return await service.rotate(key, body, ACTOR, grantor=None)

    @api.delete("/customers/{customer_id}/keys/{key_id}", status_code=204)
    async def revoke_key(customer_id: str, key_id: str) -> None:
        await service.revoke(await service.key(customer_id, key_id), ACTOR)

    @api.get("/audit", summary="The audit log, newest first")
    async def audit_log(
        subject: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, list[dict[str, Any]]]:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT at, actor, action, subject, detail FROM audit_log"
                " WHERE %s::text IS NULL OR subject = %s ORDER BY id DESC LIMIT %s",
                (subject, subject, limit),
            )
            rows = await cur.fetchall()
        keys = ("at", "actor", "action", "subject", "detail")
        return {"entries": [dict(zip(keys, row, strict=True)) for row in rows]}

    return api
