"""Self-service: the plans on offer, sign-up, and a customer managing its own keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, EmailStr, Field

from schemas.api_keys import Holder, Scope
from schemas.plans import Plan
from schemas.text import PRINTABLE_PATTERN
from services.api.accounts import store as accounts
from services.api.accounts.admin_routes import IdPath
from services.api.accounts.service import (
    Accounts,
    IssuedKey,
    NewKeyRequest,
    OpenedAccount,
    RotatedKey,
    Rotation,
)
from services.api.accounts.store import ApiKey
from services.common import catalog
from services.common.auth import Caller, address, credential
from services.common.logging import get_logger
from services.common.openapi import problem_responses
from services.common.problems import invalid_field

log = get_logger("tally.accounts")


class SignUp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    company: Annotated[str, Field(min_length=1, max_length=200, pattern=PRINTABLE_PATTERN)]
    plan: Annotated[str, Field(min_length=1, max_length=64)] = "free"


class PlanList(BaseModel):
    plans: list[Plan]


class KeyList(BaseModel):
    keys: list[ApiKey]


def router(service: Accounts) -> APIRouter:
    api = APIRouter(tags=["accounts"], responses=problem_responses(503))
    auth = service.auth

    async def signed_in(request: Request) -> Caller:
        caller = await auth.caller(credential(request), address(request))
        if caller.customer is None:
            raise invalid_field("header.authorization", "use the customer's own API key here")
        await auth.require(caller, caller.customer, Scope.KEYS)
        return caller

    async def own_key(caller: Caller) -> Holder:
        """The caller's key as PostgreSQL has it: the most it may pass on."""
        assert caller.customer is not None
        return (await service.key(caller.customer, caller.key_id)).holder()

    @api.get("/v1/plans", summary="The plans on offer")
    async def plans() -> PlanList:
        async with service.pool.connection() as conn:
            return PlanList(plans=[p for p in await catalog.read_plans(conn) if p.public])

    @api.post(
        "/v1/signup",
        status_code=201,
        summary="Create a customer and its first API key",
        responses=problem_responses(409, 422, 429),
    )
    async def signup(body: SignUp, request: Request) -> OpenedAccount:
        service.admit_address(address(request))
        plan = await service.plan(body.plan)
        if not plan.public:
            raise invalid_field("body.plan", f"plan {plan.id!r} is not offered at sign-up")
        actor = f"signup:{address(request)}"
        return await service.open_account(body.email, body.company, plan, actor)

    @api.get(
        "/v1/keys",
        summary="The caller's keys (never their secrets)",
        responses=problem_responses(401, 403, 422, 429),
    )
    async def list_keys(request: Request) -> KeyList:
        caller = await signed_in(request)
        assert caller.customer is not None
        async with service.pool.connection() as conn:
            return KeyList(keys=await accounts.list_keys(conn, caller.customer))

    @api.post(
        "/v1/keys",
        status_code=201,
        summary="Issue another key; its secret is shown once",
        responses=problem_responses(401, 403, 404, 422, 429),
    )
    async def new_key(body: NewKeyRequest, request: Request) -> IssuedKey:
        caller = await signed_in(request)
        assert caller.customer is not None
        return await service.new_key(
            caller.customer, body, f"customer:{caller.key_id}", grantor=await own_key(caller)
        )

    @api.post(
        "/v1/keys/{key_id}/rotate",
        status_code=201,
        summary="Replace a key, with grace",
        responses=problem_responses(401, 403, 404, 409, 422, 429),
    )
    async def rotate(key_id: IdPath, body: Rotation, request: Request) -> RotatedKey:
        caller = await signed_in(request)
        assert caller.customer is not None
        key = await service.key(caller.customer, key_id)
        return await service.rotate(
            key, body, f"customer:{caller.key_id}", grantor=await own_key(caller)
        )

    @api.delete(
        "/v1/keys/{key_id}",
        status_code=204,
        response_class=Response,
        summary="Revoke a key now",
        responses=problem_responses(401, 403, 404, 422, 429),
    )
    async def revoke(key_id: IdPath, request: Request) -> None:
        caller = await signed_in(request)
        assert caller.customer is not None
        key = await service.key(caller.customer, key_id)
        await service.revoke(key, f"customer:{caller.key_id}")

    return api
