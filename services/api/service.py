"""The API as a running service: usage, enforcement, accounts and admin."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

from services.api.accounts import admin_routes
from services.api.accounts import routes as account_routes
from services.api.accounts.routes import Accounts
from services.api.auth import Authenticator
from services.api.enforcement import routes as enforce_routes
from services.api.enforcement.enforcer import Enforcer
from services.api.enforcement.limiter import Limiter
from services.api.enforcement.pipelined import Pipelined
from services.api.usage import routes as usage_routes
from services.common.logging import get_logger
from services.common.settings import DEV_ADMIN_TOKEN, DEV_PEPPER, Settings
from services.runtime import Component, Runtime

log = get_logger("tally.api")


def limits_store(settings: Settings) -> Redis:
    """Redis for what surrounds decisions (key lookups, projections), with short
    timeouts: waiting on a sick Redis is worse than the configured failure mode."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.enforce_redis_connections,
        timeout=settings.enforce_redis_timeout,
        socket_timeout=settings.enforce_redis_timeout,
        socket_connect_timeout=settings.enforce_redis_timeout,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


async def start(runtime: Runtime) -> Component:
    settings, pool = runtime.settings, await runtime.pool()
    if not settings.embedded_kafka:
        if settings.admin_token == DEV_ADMIN_TOKEN:
            log.warning("the development admin token is accepted: set TALLY_ADMIN_TOKEN")
        if settings.key_pepper == DEV_PEPPER:
            log.warning("API keys are hashed under the development pepper: set TALLY_KEY_PEPPER")
    redis = limits_store(settings)
    runtime.stack.push_async_callback(redis.connection_pool.disconnect)
    decisions = Pipelined(settings.redis_url, settings.enforce_redis_timeout)
    runtime.stack.push_async_callback(decisions.aclose)
    grace_ms = round(settings.past_due_grace_hours * 3_600_000)
    limiter = Limiter(decisions, settings.reservation_ttl_seconds * 1000, grace_ms)
    auth = Authenticator(settings, redis, pool, limiter)
    enforcer = Enforcer(settings, redis, pool, limiter)
    accounts = Accounts(settings, redis, pool, auth)
    return Component(
        "api",
        routers=[
            usage_routes.router(runtime.redis(), pool, auth),
            account_routes.router(accounts),
            admin_routes.router(accounts),
        ],
        checks={"redis": runtime.check_redis(), "postgres": runtime.check_postgres()},
        schemas=enforce_routes.openapi_schemas(),
        fast_routes=enforce_routes.routes(auth, enforcer),
        paths=enforce_routes.openapi_paths(),
    )
