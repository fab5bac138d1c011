"""Guessing credentials: every route family refuses an address that keeps guessing.

Ingest, billing (invoices, the Stripe pages) and the api's admin routes run in one
process over the real stores, as `tally up` has them; each guess is a well-formed key
from the real generator (it passes the checksum, so only a lookup can reject it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from starlette.types import ASGIApp

from schemas import api_keys
from schemas.events import utcnow
from services.api import service as api_service
from services.billing.invoicing import routes
from services.billing.stripe import routes as stripe_routes
from services.billing.stripe.sessions import Sessions
from services.billing.stripe.webhooks import Webhooks
from services.common.settings import Settings
from services.ingest import service as ingest_service
from services.runtime import Component, Runtime, http_app
from tests.accounts_support import ADMIN, Account, random_address, sign_up
from tests.billing_support import WEBHOOK_SECRET
from tests.support import sample_event

GUESSES = 40
Send = Callable[[httpx.AsyncClient, str, str], Awaitable[httpx.Response]]


async def billing_component(runtime: Runtime) -> Component:
    """The billing service's routes as its ``start`` wires them, without its scheduled
    rollups and billing runs (they would bill other tests' customers)."""
    pool = await runtime.pool()
    auth = await runtime.authenticator()
    hooks = Webhooks(pool, runtime.redis(), WEBHOOK_SECRET, "free")
    return Component(
        "billing",
        routers=[
            routes.router(pool, auth, runtime.clickhouse),
            stripe_routes.router(auth, Sessions(pool, None), hooks),
        ],
    )


@dataclass
class Tally:
    """One process serving ingest, billing and api; a client per client address."""

    app: ASGIApp
    settings: Settings

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(self.app, client=(random_address(), 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.fixture
async def tally(settings: Settings) -> AsyncIterator[Tally]:
    settings = settings.model_copy(update={"admin_token": "test-admin-token"})
    async with Runtime(settings) as runtime:
        components = [
            await ingest_service.start(runtime),
            await billing_component(runtime),
            await api_service.start(runtime),
        ]
        yield Tally(http_app(components), settings)


async def post_events(client: httpx.AsyncClient, token: str, customer: str) -> httpx.Response:
    event = sample_event(id=uuid.uuid4().hex, subject=customer, time=utcnow().isoformat())
    return await client.post(
        "/v1/events",
        json=event,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/cloudevents+json",
        },
    )


async def list_invoices(client: httpx.AsyncClient, token: str, customer: str) -> httpx.Response:
    return await client.get(
        f"/v1/customers/{customer}/invoices", headers={"Authorization": f"Bearer {token}"}
    )


async def open_portal(client: httpx.AsyncClient, token: str, customer: str) -> httpx.Response:
    return await client.post(
        f"/v1/customers/{customer}/billing/portal",
        json={"return_url": "https://app.example/account"},
        headers={"Authorization": f"Bearer {token}"},
    )


async def admin_plans(client: httpx.AsyncClient, token: str, customer: str) -> httpx.Response:
    return await client.get("/v1/admin/plans", headers={"Authorization": f"Bearer {token}"})


def guess() -> str:
    return api_keys.generate().secret


# (route, how it is called, what the real credential of another address then gets:
# 503 for the portal is "Stripe is not configured", reached only once authenticated)
ROUTES = [
    pytest.param(post_events, 202, id="POST /v1/events"),
    pytest.param(list_invoices, 200, id="GET /v1/customers/{c}/invoices"),
    pytest.param(open_portal, 503, id="POST /v1/customers/{c}/billing/portal"),
    pytest.param(admin_plans, 200, id="GET /v1/admin/plans"),
]


async def _owner(tally: Tally) -> Account:
    async with tally.client() as client:
        return await sign_up(client, "pro")


@pytest.mark.parametrize(("send", "valid_status"), ROUTES)
async def test_guessing_from_one_address_is_refused_before_any_lookup(
    tally: Tally, database_url: str, send: Send, valid_status: int
) -> None:
    owner = await _owner(tally)
    async with tally.client() as attacker, tally.client() as bystander:
        replies = [await send(attacker, guess(), owner.customer) for _ in range(GUESSES)]
        codes = [r.status_code for r in replies]
        assert 429 in codes, codes
        first = codes.index(429)
        limit = tally.settings.ip_auth_failures_per_minute
        assert codes == [401] * first + [429] * (GUESSES - first)
        assert first == limit, codes
        refusal = replies[first]
        assert refusal.headers["content-type"] == "application/problem+json"
        assert 1 <= int(refusal.headers["Retry-After"]) <= 60
        assert refusal.headers["RateLimit-Policy"] == f'"auth-failures";q={limit};w=60'
        assert refusal.json()["status"] == 429 and "address" in refusal.json()["detail"]

        # A refused guess touches neither store's key index: with api_keys locked, a
        # lookup would wait for the lock; the refusal comes at once.
        conn = await psycopg.AsyncConnection.connect(database_url)
        async with conn, conn.transaction():
            await conn.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            late = await asyncio.wait_for(send(attacker, guess(), owner.customer), 5)
        assert late.status_code == 429

        token = "test-admin-token" if send is admin_plans else owner.key
        assert (await send(bystander, token, owner.customer)).status_code == valid_status
        # the attacker's address, even with the right credential, must wait
        assert (await send(attacker, token, owner.customer)).status_code == 429


async def test_concurrent_guesses_are_told_401_no_more_often_than_the_limit(
    tally: Tally,
) -> None:
    """All of them pass the check before any is counted: past the limit, the guesses
    that failed are answered 429 (an outside review saw 29 401s for a limit of 20)."""
    owner = await _owner(tally)
    limit = tally.settings.ip_auth_failures_per_minute
    async with tally.client() as attacker:
        replies = await asyncio.gather(
            *(list_invoices(attacker, guess(), owner.customer) for _ in range(limit + 15))
        )
    codes = sorted(r.status_code for r in replies)
    assert codes == [401] * limit + [429] * 15, codes
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["Retry-After"]) >= 1


async def test_wrong_service_and_admin_tokens_are_guesses_too(tally: Tally) -> None:
    owner = await _owner(tally)
    limit = tally.settings.ip_auth_failures_per_minute
    async with tally.client() as attacker:
        codes = [
            (await post_events(attacker, f"svc-{uuid.uuid4().hex}", owner.customer)).status_code
            for _ in range(limit + 2)
        ]
        assert codes == [401] * limit + [429] * 2
        assert (await post_events(attacker, "test-token", owner.customer)).status_code == 429
    async with tally.client() as attacker:
        codes = [
            (await admin_plans(attacker, uuid.uuid4().hex, "")).status_code
            for _ in range(limit + 2)
        ]
        assert codes == [401] * limit + [429] * 2
        assert (await admin_plans(attacker, "test-admin-token", "")).status_code == 429
    async with tally.client() as other:
        assert (await post_events(other, "test-token", owner.customer)).status_code == 202
        assert (await other.get("/v1/admin/plans", headers=ADMIN)).status_code == 200
