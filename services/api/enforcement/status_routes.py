"""``GET /v1/customers/{c}/limits``: every limit's state, read without spending any.

An ordinary FastAPI route, not a hot path: dashboards poll it, callers deciding per
request use ``/v1/enforce``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN
from schemas.text import PRINTABLE_PATTERN
from services.api.enforcement.status import Facts, LimitsReader, LimitsStatus, PolicyState
from services.common.auth import Authenticator, Caller, address, credential
from services.common.openapi import problem_responses
from services.common.queries import single_values
from services.common.settings import Settings
from services.common.zone_book import ZoneOf, in_utc

Amount = int | str  # whole amounts as JSON numbers, fractional ones as decimal strings


class LimitState(BaseModel):
    """One rate limit or quota now, as the next enforcement decision will count it."""

    policy: str
    kind: Literal["rate", "quota"]
    meter: str | None = Field(description="Quotas: the meter they bound")
    endpoint: str | None = Field(description="Rate limits on one endpoint only")
    scope: list[str] | None = Field(
        None,
        description="Rate limits counted per key, end_user and/or endpoint: the state told"
        " is the one of the key (the caller's own), endpoint and end_user of the query",
    )
    algorithm: str | None = Field(description="Rate limits only")
    burst: int | None = Field(description="Rate limits: tokens held at most (token_bucket, gcra)")
    hard: bool | None = Field(description="Quotas: refused beyond the limit (else billed)")
    limit: Amount = Field(description="Units per window (rate limits: calls of cost 1)")
    used: Amount = Field(
        description="Quotas: usage counted this period; rate limits: tokens spent and not"
        " yet refilled (token_bucket, gcra) or calls counted in the window"
    )
    held: Amount = Field(
        description="Held by open reservations and leases (quotas; 0 for rate limits)"
    )
    remaining: Amount = Field(description="What calls of cost 1 may still take now")
    reset: int = Field(description="Seconds until it resets, as /v1/enforce reports it")
    reset_at: datetime = Field(description="When it resets (RFC 3339)")
    window: int = Field(description="Seconds (quotas: the month in the billing zone)")


class LimitsQuery(BaseModel):
    """Unknown parameters are refused, named: a misspelt ``endpoint`` would read the
    plan-wide state instead of the endpoint's."""

    model_config = ConfigDict(extra="forbid")

    endpoint: Annotated[str, Field(max_length=256, pattern=PRINTABLE_PATTERN)] = Field(
        "", description="The endpoint whose limits and costs to read (rate limits per endpoint)"
    )
    end_user: Annotated[str, Field(max_length=256, pattern=PRINTABLE_PATTERN)] = Field(
        "", description="The end user whose state to read (rate limits per end user)"
    )


class CustomerLimits(BaseModel):
    customer: str
    plan: str
    account_status: str
    as_of: datetime = Field(description="When the state was read (the limits store's clock)")
    limits: list[LimitState] = Field(description="Rate limits in the plan's order, then quotas")
    endpoint_costs: dict[str, int] = Field(
        description="What one call to an endpoint takes from the rate limits (default 1)"
    )


def router(
    settings: Settings,
    redis: Redis,
    pool: AsyncConnectionPool,
    auth: Authenticator,
    zone_of: ZoneOf = in_utc,
) -> APIRouter:
    api = APIRouter(tags=["enforcement"])
    reader = LimitsReader(settings, redis, pool, zone_of)

    async def who(request: Request) -> None:
        """The caller and its right to read, settled before the query is read (a
        dependency runs before the parameters are validated): without a valid key a 401,
        with another customer's a 403, rather than a 422 about the query."""
        caller = await auth.caller(credential(request), address(request))
        await auth.require(caller, request.path_params["customer"], Scope.USAGE_READ)
        request.state.caller = caller
        single_values(request)

    @api.get(
        "/v1/customers/{customer}/limits",
        summary="Every rate limit and quota of the customer's plan: used, held, remaining,"
        " reset; spends nothing",
        responses=problem_responses(401, 403, 404, 422, 429, 503),
        dependencies=[Depends(who)],
    )
    async def limits(
        request: Request,
        customer: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)],
        query: Annotated[LimitsQuery, Query()],
    ) -> CustomerLimits:
        """Limits scoped per key are read for the calling key (service tokens: theirs)."""
        caller: Caller = request.state.caller  # may read ``customer`` (``who``)
        facts = Facts(caller.key_id, query.endpoint, query.end_user)
        return answer(customer, await reader.read(customer, facts=facts))

    return api


def answer(customer: str, status: LimitsStatus) -> CustomerLimits:
    return CustomerLimits(
        customer=customer,
        plan=status.plan,
        account_status=status.status,
        as_of=status.as_of,
        limits=[_state(p, status.as_of) for p in status.limits],
        endpoint_costs=status.endpoint_costs,
    )


def _state(policy: PolicyState, as_of: datetime) -> LimitState:
    return LimitState(
        policy=policy.policy,
        kind="quota" if policy.kind == "quota" else "rate",
        meter=policy.meter,
        endpoint=policy.endpoint,
        scope=list(policy.scope) or None,
        algorithm=policy.algorithm,
        burst=policy.burst,
        hard=policy.hard,
        limit=_number(policy.limit),
        used=_number(policy.used),
        held=_number(policy.held),
        remaining=_number(policy.remaining),
        reset=-(-policy.reset_ms // 1000),
        reset_at=as_of + timedelta(milliseconds=policy.reset_ms),
        window=-(-policy.window_ms // 1000),
    )


def _number(amount: Decimal) -> Amount:
    return int(amount) if amount == amount.to_integral_value() else str(amount.normalize())
