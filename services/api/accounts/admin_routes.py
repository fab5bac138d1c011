"""The admin API for accounts (admin token): customers, their keys, the audit log.

Every change is written to PostgreSQL with an audit entry, then projected into Redis
before the response, so enforcement applies it from the very next request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field

from schemas import zones
from schemas.events import CUSTOMER_ID_PATTERN
from schemas.notifications import moment
from schemas.problem_types import CUSTOMER_EXISTS, TIMEZONE_LOCKED
from schemas.text import PRINTABLE_PATTERN
from services.api.accounts import store as accounts
from services.api.accounts.service import (
    Accounts,
    IssuedKey,
    NewKeyRequest,
    OpenedAccount,
    RotatedKey,
    Rotation,
    plan_changed,
    tell,
)
from services.api.accounts.store import ApiKey, Customer, Status
from services.common.auth import address, credential
from services.common.openapi import problem_responses
from services.common.problems import Problem

ACTOR = "admin"

CustomerPath = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]
IdPath = Annotated[str, Path(pattern=PRINTABLE_PATTERN)]
"""Ids in paths: control characters are refused by name (``schemas.text``)."""


def _billing_zone(name: str) -> str:
    try:
        return zones.billing_zone(name)
    except zones.ZoneError as exc:
        raise ValueError(str(exc)) from None


BillingZone = Annotated[
    str,
    Field(
        max_length=64,
        description="IANA time zone whose offset is a whole number of hours: where the"
        " customer's billing periods start (local midnight); UTC by default",
    ),
    AfterValidator(_billing_zone),
]


class NewCustomer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str | None, Field(pattern=CUSTOMER_ID_PATTERN)] = Field(
        None, description="Your own id for the customer (the events' subject); default cus_…"
    )
    email: EmailStr
    company: Annotated[str, Field(max_length=200, pattern=PRINTABLE_PATTERN)] = ""
    plan: str = "free"
    issue_key: bool = True
    timezone: BillingZone = "UTC"


class CustomerChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = None
    status: Status | None = None
    timezone: BillingZone | None = Field(
        None, description="Until the customer's first invoice: its periods move with it."
    )


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


async def _set_timezone(conn: Any, customer_id: str, timezone: str) -> None:
    try:
        await accounts.set_timezone(conn, customer_id, timezone, ACTOR)
    except accounts.Invoiced:
        raise Problem(
            TIMEZONE_LOCKED,
            f"{customer_id!r} has invoices: a new billing time zone would move periods"
            " already billed",
        ) from None


def admin_api(service: Accounts) -> APIRouter:
    """A router under ``/v1/admin`` whose every route asks for the admin token first."""

    async def admin(request: Request) -> None:
        await service.auth.admin(credential(request), address(request))

    return APIRouter(
        prefix="/v1/admin",
        tags=["admin"],
        dependencies=[Depends(admin)],
        responses=problem_responses(401, 429, 503),
    )


def router(service: Accounts) -> APIRouter:
    api = admin_api(service)
    pool = service.pool

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
            body.email,
            body.company,
            plan,
            ACTOR,
            customer_id=body.id,
            with_key=body.issue_key,
            timezone=body.timezone,
        )

    @api.get(
        "/customers/{customer_id}",
        summary="One customer and its keys",
        responses=problem_responses(404, 422),
    )
    async def get_customer(customer_id: CustomerPath) -> CustomerDetail:
        customer = await service.customer(customer_id)
        async with pool.connection() as conn:
            keys = await accounts.list_keys(conn, customer_id)
        return CustomerDetail(customer=customer, keys=keys)

    @api.patch(
        "/customers/{customer_id}",
        summary="Change plan, status or (until the first invoice) billing time zone",
        responses=problem_responses(404, 409, 422),
    )
    async def change_customer(customer_id: CustomerPath, body: CustomerChange) -> Customer:
        await service.customer(customer_id)
        plan = await service.plan(body.plan) if body.plan else None
        changed = None
        async with pool.connection() as conn:
            if body.timezone is not None:
                await _set_timezone(conn, customer_id, body.timezone)
            if plan is not None:
                changed = await accounts.change_plan(conn, customer_id, plan, ACTOR)
            if body.status is not None:
                await accounts.set_status(conn, customer_id, body.status, ACTOR)
        await service.reproject(customer_id)
        if plan is not None and changed is not None:
            before, at = changed
            note = plan_changed(customer_id, before, plan.id, ACTOR, moment(at), at)
            await tell(service.redis, note)
        return await service.customer(customer_id)

    @api.post(
        "/customers/{customer_id}/keys",
        status_code=201,
        summary="Issue a key",
        responses=problem_responses(404, 422),
    )
    async def new_key(customer_id: CustomerPath, body: NewKeyRequest) -> IssuedKey:
        await service.customer(customer_id)
        return await service.new_key(customer_id, body, ACTOR, grantor=None)

    @api.post(
        "/customers/{customer_id}/keys/{key_id}/rotate",
        status_code=201,
        responses=problem_responses(404, 409, 422),
    )
    async def rotate_key(customer_id: CustomerPath, key_id: IdPath, body: Rotation) -> RotatedKey:
        key = await service.key(customer_id, key_id)
        return await service.rotate(key, body, ACTOR, grantor=None)

    @api.delete(
        "/customers/{customer_id}/keys/{key_id}",
        status_code=204,
        response_class=Response,
        responses=problem_responses(404, 422),
    )
    async def revoke_key(customer_id: CustomerPath, key_id: IdPath) -> None:
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
