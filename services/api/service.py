"""The API as a running service: usage, enforcement, accounts and admin."""

from __future__ import annotations

from services.api.accounts import admin_routes, projection
from services.api.accounts import routes as account_routes
from services.api.accounts.service import Accounts
from services.api.analytics import routes as analytics_routes
from services.api.analytics.runner import Runner, reader_settings
from services.api.catalog import meter_routes
from services.api.catalog import routes as catalog_routes
from services.api.enforcement import routes as enforce_routes
from services.api.enforcement import status_routes
from services.api.enforcement.address_limit import AddressLimit
from services.api.enforcement.enforcer import Enforcer
from services.api.enforcement.leaser import Leaser
from services.api.enforcement.leases import Leases
from services.api.enforcement.limiter import Limiter
from services.api.enforcement.pipelined import Pipelined
from services.api.openmeter import routes as openmeter_routes
from services.api.portal import pages as portal_pages
from services.api.portal import routes as portal_routes
from services.api.portal.view import DashboardView
from services.api.usage import routes as usage_routes
from services.runtime import Component, Runtime


async def start(runtime: Runtime) -> Component:
    return await _start(runtime, with_analytics=True)


async def start_without_analytics(runtime: Runtime) -> Component:
    """The API but analytics SQL: ``tally up``'s front process, whose back process owns
    chDB and serves analytics SQL (``start_analytics``)."""
    return await _start(runtime, with_analytics=False)


async def start_analytics(runtime: Runtime) -> Component:
    """Analytics SQL alone, in the process that owns chDB (``tally up``'s back)."""
    analytics = analytics_routes.Analytics(
        runtime.settings,
        await runtime.authenticator(),
        analytics_runner(runtime),
        runtime.settings.clickhouse_database,
    )
    return Component("analytics", routers=[analytics_routes.router(analytics)])


async def _start(runtime: Runtime, with_analytics: bool) -> Component:
    settings, pool = runtime.settings, await runtime.pool()
    redis = runtime.limits_store()
    decisions = Pipelined(settings.redis_url, settings.enforce_redis_timeout)
    runtime.stack.push_async_callback(decisions.aclose)
    grace_ms = round(settings.past_due_grace_hours * 3_600_000)
    runtime.background(projection.keep_zones_synced(redis, pool), "billing zones")
    zones = await runtime.zones()
    zone_of = zones.zone
    limiter = Limiter(decisions, settings.reservation_ttl_seconds * 1000, grace_ms, zone_of)
    auth, addresses = await runtime.authenticator(), AddressLimit(settings.ip_limit_per_second)
    meters = await runtime.meters()
    enforcer = Enforcer(settings, redis, pool, limiter, meters)
    usage = usage_routes.Usage(runtime.redis(), pool, auth, meters)
    settle = settings.reservation_ttl_seconds
    leaser = Leaser(
        decisions, settings.lease_ttl_ms, settle * 1000, settings.lease_share, grace_ms, zone_of
    )
    leases = Leases(enforcer, leaser, settle)
    accounts = Accounts(settings, redis, pool, auth, addresses.check, zones)
    dashboard = DashboardView(settings, runtime.redis(), pool, meters, zone_of)
    sql = [(await start_analytics(runtime)).routers[0]] if with_analytics else []
    return Component(
        "api",
        routers=[
            usage_routes.router(usage, meters),
            status_routes.router(settings, runtime.redis(), pool, auth, zone_of),
            account_routes.router(accounts),
            admin_routes.router(accounts),
            catalog_routes.router(accounts),
            meter_routes.router(accounts, meters),
            openmeter_routes.router(
                openmeter_routes.OpenMeterMeters(usage.reader, pool, auth, meters)
            ),
            portal_routes.router(settings, pool, auth, meters),
            portal_pages.router(settings, auth, dashboard),
            *sql,
        ],
        checks={"redis": runtime.check_redis(), "postgres": runtime.check_postgres()},
        schemas=enforce_routes.openapi_schemas(),
        fast_routes=enforce_routes.routes(auth, addresses, enforcer)
        + enforce_routes.lease_routes(auth, addresses, leases)
        + usage_routes.fast_routes(usage),
        paths=enforce_routes.openapi_paths(),
    )


def analytics_runner(runtime: Runtime) -> Runner | None:
    """Analytics SQL's runner, on a read-only connection of its own; ``None`` where this
    process may not read ClickHouse: chDB that another process owns (``tally api`` beside
    ``tally aggregator``) is never opened from here."""
    if not (runtime.settings.clickhouse_url or runtime.clickhouse_open):
        return None
    limits = reader_settings(runtime.settings)
    runner = Runner(lambda: runtime.clickhouse().reader(limits))
    runtime.stack.callback(runner.close)
    return runner
