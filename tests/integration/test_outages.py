"""A store that is down: every route that reads it answers 503 problem+json naming the
store, with Retry-After, within a bounded time (never a 500, never a hang).

Redis is taken away by a closed port (refused at once) or a blackhole (a listener that
takes connections and never answers); PostgreSQL by a blackhole, which proves the bound:
without timeouts a connection to it waits for minutes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal

import httpx
import psycopg

from schemas import api_keys
from schemas.plans import Plan, Price
from services.api.catalog import store as catalog_store
from services.billing.invoicing import routes as billing_routes
from services.common.problems import unavailable_store
from services.common.settings import Settings
from services.ingest.app import Ingest
from services.ingest.app import router as ingest_router
from services.ingest.publisher import Publisher
from services.runtime import Component, Runtime, http_app
from tests.accounts_support import running_api
from tests.billing_support import at, subscribe
from tests.support import blackhole

SERVICE = {"Authorization": "Bearer test-token"}
REFUSED_REDIS = "redis://127.0.0.1:1/0"
BOUND = 5.0  # seconds: the default timeouts are 2 s


def assert_unavailable(reply: httpx.Response, store: str, path: str) -> None:
    assert reply.status_code == 503, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert int(reply.headers["retry-after"]) > 0
    body = reply.json()
    assert body["type"].endswith("/store-unavailable")
    assert body["status"] == 503 and body["store"] == store
    assert body["instance"] == path
    assert store in body["detail"].lower()


async def timed(call: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = await call
    return reply, time.monotonic() - started


def usage_path(tenant: str) -> str:
    return f"/v1/customers/{tenant}-c/usage"


def pg_blackhole_url(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/tally"


@asynccontextmanager
async def app_of(
    settings: Settings, build: Callable[[Runtime], Awaitable[Component]]
) -> AsyncIterator[httpx.AsyncClient]:
    async with Runtime(settings) as runtime:
        app = http_app([await build(runtime)])
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://t"
        ) as client:
            yield client


async def test_usage_with_redis_refused_answers_503_at_once(settings: Settings, tenant) -> None:
    async with running_api(settings, redis_url=REFUSED_REDIS) as api:
        reply, elapsed = await timed(
            api.get(usage_path(tenant), params={"meter": "api_calls"}, headers=SERVICE)
        )
    assert_unavailable(reply, "redis", usage_path(tenant))
    assert elapsed < 1.5


async def test_usage_with_redis_blackholed_answers_503_within_the_bound(
    settings: Settings, tenant
) -> None:
    with blackhole() as port:
        async with running_api(settings, redis_url=f"redis://127.0.0.1:{port}/0") as api:
            reply, elapsed = await timed(
                api.get(usage_path(tenant), params={"meter": "api_calls"}, headers=SERVICE)
            )
    assert_unavailable(reply, "redis", usage_path(tenant))
    assert elapsed < BOUND


async def test_api_with_postgresql_blackholed_answers_503_within_the_bound(
    settings: Settings, tenant
) -> None:
    """The usage API, the enforcement hot path (answered ahead of FastAPI) and /readyz,
    which still names each store's state."""
    with blackhole() as port:
        async with running_api(settings, database_url=pg_blackhole_url(port)) as api:
            usage, usage_took = await timed(
                api.get(usage_path(tenant), params={"meter": "api_calls"}, headers=SERVICE)
            )
            enforce, enforce_took = await timed(
                api.post("/v1/enforce", json={"customer": f"{tenant}-c"}, headers=SERVICE)
            )
            ready = await api.get("/readyz")
    assert_unavailable(usage, "postgresql", usage_path(tenant))
    assert_unavailable(enforce, "postgresql", "/v1/enforce")
    assert usage_took < BOUND and enforce_took < BOUND
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["api.redis"] == "ok" and checks["api.postgres"].startswith("failed")


async def test_invoices_with_postgresql_blackholed_answer_503_within_the_bound(
    settings: Settings, tenant
) -> None:
    async def billing(runtime: Runtime) -> Component:
        pool, auth = await runtime.pool(), await runtime.authenticator()
        return Component("billing", [billing_routes.router(pool, auth, runtime.clickhouse)])

    path = f"/v1/customers/{tenant}-c/invoices"
    with blackhole() as port:
        down = settings.model_copy(update={"database_url": pg_blackhole_url(port)})
        async with app_of(down, billing) as client:
            reply, elapsed = await timed(client.get(path, headers=SERVICE))
    assert_unavailable(reply, "postgresql", path)
    assert elapsed < BOUND


async def test_ingest_with_a_customer_key_and_postgresql_blackholed_answers_503(
    settings: Settings,
) -> None:
    async def ingest(runtime: Runtime) -> Component:
        found = Ingest(runtime.settings, Publisher(producer=None), await runtime.authenticator())
        return Component("ingest", [ingest_router(found)])

    key = {"Authorization": f"Bearer {api_keys.generate().secret}"}
    with blackhole() as port:
        down = settings.model_copy(update={"database_url": pg_blackhole_url(port)})
        async with app_of(down, ingest) as client:
            reply, elapsed = await timed(client.post("/v1/events", json=[], headers=key))
    assert_unavailable(reply, "postgresql", "/v1/events")
    assert elapsed < BOUND


async def test_upcoming_invoice_with_clickhouse_refused_answers_503(
    settings: Settings, pool, tenant
) -> None:
    """A distinct-count meter is billed from raw events, so the upcoming invoice of a
    plan pricing one reads ClickHouse (here a server that refuses connections)."""
    seats = Plan(
        id=f"seats-{tenant}",
        name="Seats",
        price=Decimal(10),
        prices={"active_users": Price(unit_price=Decimal(2), included=Decimal(1))},
    )
    async with pool.connection() as conn:
        await catalog_store.save_plan(conn, seats, "test")
    customer = f"{tenant}-{uuid.uuid4().hex[:6]}"
    await subscribe(pool, customer, seats.id, at("2026-01-01"))

    async def billing(runtime: Runtime) -> Component:
        auth = await runtime.authenticator()
        return Component("billing", [billing_routes.router(pool, auth, runtime.clickhouse)])

    path = f"/v1/customers/{customer}/invoices/upcoming"
    down = settings.model_copy(update={"clickhouse_url": "http://127.0.0.1:1/"})
    async with app_of(down, billing) as client:
        reply, elapsed = await timed(client.get(path, headers=SERVICE))
    assert_unavailable(reply, "clickhouse", path)
    assert elapsed < BOUND


def test_only_outages_of_postgresql_are_store_unavailable() -> None:
    """A deadlock or a lock not available is the request's failure, not an outage."""
    assert unavailable_store(psycopg.errors.AdminShutdown("shutting down")) == "postgresql"
    assert unavailable_store(psycopg.errors.TooManyConnections("full")) == "postgresql"
    assert unavailable_store(psycopg.OperationalError("connection refused")) == "postgresql"
    assert unavailable_store(psycopg.errors.DeadlockDetected("deadlock")) is None
    assert unavailable_store(psycopg.errors.LockNotAvailable("locked")) is None
