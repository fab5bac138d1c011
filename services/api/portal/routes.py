"""``POST /v1/customers/{c}/portal-tokens``: the seller mints a link to a customer's
dashboard, to send or to embed.

Only the seller mints: a service token or the admin token.  A customer's own API key is
refused (403): the customer signs in to ``/portal`` with that key directly, and a key
that could mint would let whoever holds it make links that outlive its revocation.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from schemas.events import CUSTOMER_ID_PATTERN
from schemas.problem_types import FORBIDDEN
from services.api.accounts import store
from services.api.portal import tokens
from services.common.auth import Authenticator, address, credential
from services.common.meter_cache import MeterCache
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field, unauthorized, unknown_customer
from services.common.settings import Settings

SHORTEST = 60
LONGEST = 30 * 86_400
MAX_METERS = 50
SELLER_ONLY = (
    "portal links are minted by the seller (a service token or the admin token);"
    " a customer signs in to /portal with its own API key"
)


class PortalTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in: int | None = Field(
        None,
        ge=SHORTEST,
        le=LONGEST,
        description=f"Seconds the link works, {SHORTEST} to {LONGEST} (default:"
        " TALLY_PORTAL_TOKEN_TTL_SECONDS, 1 h)",
    )
    meters: list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_METERS,
        description="Show only these meters (default: every meter)",
    )


class PortalToken(BaseModel):
    customer: str
    token: str = Field(description="A bearer credential for this customer's dashboard")
    url: str = Field(description="The dashboard link: TALLY_PUBLIC_URL/portal?token=…")
    expires_at: datetime
    meters: list[str] | None = Field(description="The meters shown; null: every meter")


def router(
    settings: Settings, pool: AsyncConnectionPool, auth: Authenticator, meters: MeterCache
) -> APIRouter:
    api = APIRouter(tags=["dashboards"])

    @api.post(
        "/v1/customers/{customer}/portal-tokens",
        status_code=201,
        summary="A link to the customer's usage dashboard (service or admin token)",
        responses=problem_responses(401, 403, 404, 422, 429, 503),
    )
    async def mint_portal_token(
        request: Request,
        customer: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)],
        body: PortalTokenRequest | None = None,
    ) -> PortalToken:
        await _seller(request, settings, auth)
        body = body or PortalTokenRequest()
        shown = await _meters(body.meters, meters)
        async with pool.connection() as conn:
            if not await store.exists(conn, customer):
                raise unknown_customer(customer)
        lifetime = timedelta(seconds=body.expires_in or settings.portal_token_ttl_seconds)
        token, grant = tokens.mint(settings, customer, lifetime, shown)
        return PortalToken(
            customer=customer,
            token=token,
            url=f"{settings.public_url}/portal?token={token}",
            expires_at=grant.expires_at,
            meters=None if shown is None else list(shown),
        )

    return api


async def _seller(request: Request, settings: Settings, auth: Authenticator) -> None:
    """The admin token or a service token; a customer's key: 403."""
    token = credential(request)
    if token is None:
        raise unauthorized("send a service token or the admin token as 'Authorization: Bearer …'")
    if auth.is_admin(token):
        return
    caller = await auth.caller(token, address(request))
    if not caller.service:
        raise Problem(FORBIDDEN, SELLER_ONLY)


async def _meters(asked: list[str] | None, meters: MeterCache) -> tuple[str, ...] | None:
    """The meters a token is limited to, each known to the catalog, listed once."""
    if asked is None:
        return None
    known = (await meters.meters()).by_name
    for index, name in enumerate(asked):
        if name not in known:
            listed = ", ".join(sorted(known))
            raise invalid_field(f"body.meters[{index}]", f"unknown meter {name!r}; known: {listed}")
    return tuple(dict.fromkeys(asked))
