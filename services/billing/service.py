"""Billing as a running service: the scheduled rollup and billing run, and invoices
over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import stripe
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from services.billing.invoicing import routes
from services.billing.invoicing.mirror import InvoiceMirror
from services.billing.invoicing.periods import months_before
from services.billing.invoicing.run import BillingRun
from services.billing.notification import alert_routes
from services.billing.notification.access import Access
from services.billing.notification.alerts.compile import AlertCompiler
from services.billing.notification.alerts.invoice import SpendWatch
from services.billing.notification.channel import Mailer
from services.billing.notification.email.mailer import build_mailer
from services.billing.notification.lifecycle import LifecycleScan
from services.billing.notification.notifier import Notifier, notifier
from services.billing.notification.period_end import PeriodEndWarning
from services.billing.revenue import pages as revenue_pages
from services.billing.revenue import routes as revenue_routes
from services.billing.rollup.job import Rollup
from services.billing.stripe import client as stripe_client
from services.billing.stripe import corrections as stripe_corrections
from services.billing.stripe import mirror as stripe_mirror
from services.billing.stripe import notices, outbox, unsent
from services.billing.stripe import routes as stripe_routes
from services.billing.stripe.outbox import MeterPusher
from services.billing.stripe.sessions import Sessions
from services.billing.stripe.webhooks import Webhooks
from services.common.logging import get_logger
from services.common.waits import surviving, wait_set
from services.runtime import Component, Runtime

log = get_logger("tally.billing")

# Periods starting this many months ago can have ended (or left their grace) this
# month: monthly ones 1-2 months back, yearly ones 12-13.
RECENT = (1, 2, 12, 13)


async def rollup(runtime: Runtime) -> Rollup:
    settings = runtime.settings
    return Rollup(
        runtime.clickhouse(),
        await runtime.pool(),
        timedelta(seconds=settings.rollup_safety_lag_seconds),
    )


async def billing_run(runtime: Runtime) -> BillingRun:
    grace = timedelta(hours=runtime.settings.invoice_grace_hours)
    mirror = InvoiceMirror(runtime.clickhouse)
    return BillingRun(
        await runtime.pool(), runtime.clickhouse, grace, redis=runtime.redis(), mirror=mirror
    )


def lifecycle_jobs(
    runtime: Runtime, pool: AsyncConnectionPool
) -> tuple[PeriodEndWarning, LifecycleScan]:
    """The jobs that tell what time brings: period ends, trials and keys running out."""
    settings, redis = runtime.settings, runtime.redis()
    warning = PeriodEndWarning(
        pool, redis, runtime.clickhouse, timedelta(hours=settings.period_end_warning_hours)
    )
    scan = LifecycleScan(
        pool,
        redis,
        timedelta(days=settings.trial_ending_days),
        timedelta(days=settings.key_expiring_days),
    )
    return warning, scan


async def start(runtime: Runtime) -> Component:
    settings = runtime.settings
    job, billing = await rollup(runtime), await billing_run(runtime)
    pool = await runtime.pool()
    warning, scan = lifecycle_jobs(runtime, pool)
    runtime.background(
        _every(lambda: _roll_up(job), "rollup", settings.rollup_interval_seconds), "rollup"
    )
    runtime.background(
        _every(lambda: _bill_recent(billing), "billing", settings.billing_interval_seconds),
        "billing",
    )
    runtime.background(
        _every(
            lambda: lifecycle_pass(warning, scan, pool, runtime.redis()),
            "lifecycle",
            settings.lifecycle_interval_seconds,
        ),
        "lifecycle",
    )
    compiler = await alert_compiler(runtime, pool)
    api = stripe_client.client(settings)
    if api is not None:
        _stripe_jobs(runtime, pool, api)
    auth = await runtime.authenticator()
    webhooks = Webhooks(
        pool, runtime.redis(), settings.stripe_webhook_secret, settings.downgrade_plan
    )
    notifications = await notify(runtime, build_mailer(settings))
    notifications.intake.listen(compiler.on_notification)  # a plan change recompiles
    return Component(
        "billing",
        routers=[
            routes.router(pool, auth, runtime.clickhouse),
            alert_routes.router(pool, Access(auth), compiler),
            stripe_routes.router(auth, Sessions(pool, api), webhooks),
            *notifications.routers,
            revenue_routes.router(pool, runtime.redis(), auth),
            revenue_pages.router(settings, pool, runtime.redis(), auth),
        ],
        checks={"clickhouse": runtime.check_clickhouse(), "postgres": runtime.check_postgres()},
    )


async def alert_compiler(runtime: Runtime, pool: AsyncConnectionPool) -> AlertCompiler:
    """Every customer's alert levels kept compiled in Redis for the aggregator: now, on
    each catalog change and on the safety-net interval (rule and plan changes recompile
    their customer at once)."""
    compiler = AlertCompiler(pool, runtime.redis())
    catalog_changed = asyncio.Event()

    async def changed() -> None:
        catalog_changed.set()

    (await runtime.meters()).on_change(changed)
    seconds = runtime.settings.alerts_recompile_seconds
    runtime.background(_recompile(compiler, catalog_changed, seconds), "alerts")
    meters, zones = await runtime.meters(), await runtime.zones()
    watch = SpendWatch(pool, runtime.redis(), meters, zones.zone)
    runtime.background(watch.run(), "spend alerts")
    return compiler


async def notify(runtime: Runtime, mailer: Mailer | None = None) -> Notifier:
    """The notifier: the stream into the outbox, and the outbox out by webhook (and by
    email with a ``mailer``), running for as long as the process serves."""
    made = notifier(
        runtime.settings,
        await runtime.pool(),
        runtime.redis(),
        await runtime.authenticator(),
        mailer,
    )
    runtime.background(made.intake.run(), "notification intake")
    runtime.background(made.sender.run(), "notification sender")
    return made


def _stripe_jobs(runtime: Runtime, pool: AsyncConnectionPool, api: stripe.StripeClient) -> None:
    """The catalog mirrored every minute; new customers and usage every few seconds."""
    settings = runtime.settings
    pusher = MeterPusher(pool, api, stream=settings.stripe_meter_event_stream)
    runtime.background(
        _every(
            lambda: _push(pool, api, pusher), "stripe push", settings.stripe_push_interval_seconds
        ),
        "stripe",
    )
    runtime.background(
        _every(lambda: _mirror(pool, api), "stripe sync", settings.stripe_sync_interval_seconds),
        "stripe sync",
    )


async def _roll_up(job: Rollup) -> None:
    report = await job.run_incremental()
    if report.cells:
        log.info("rollup", cells=report.cells, rows=report.rows, watermark=report.watermark)


async def _push(pool: AsyncConnectionPool, api: stripe.StripeClient, pusher: MeterPusher) -> None:
    """Create new sign-ups' Stripe customers, queue the rollups' changes, send what is due,
    and tell Stripe of the corrections booked on finalized invoices and of the usage it
    was never sent."""
    customers = await stripe_client.ensure_new_customers(pool, api)
    queued = await outbox.enqueue(pool)
    report = await pusher.push()
    corrected = await stripe_corrections.push(pool, api)
    settled = await unsent.settle(pool, api)
    if customers or queued or report.sent or report.failed or corrected or settled:
        log.info(
            "stripe push",
            customers=customers,
            queued=queued,
            report=report,
            corrected=corrected,
            settled=settled,
        )


async def lifecycle_pass(
    warning: PeriodEndWarning, scan: LifecycleScan, pool: AsyncConnectionPool, redis: Redis
) -> None:
    """What time brings, and what a crash between a commit and its publish lost."""
    warned, report = await warning.run(), await scan.run()
    async with pool.connection() as conn:
        payments = await notices.retell(conn, redis, datetime.now(UTC))
    if warned or report.trials or report.keys or report.invoices or report.plans or payments:
        log.info("lifecycle notifications", period_end=warned, report=report, payments=payments)


async def _recompile(compiler: AlertCompiler, changed: asyncio.Event, seconds: float) -> None:
    """Every customer's alert levels: at start, when the catalog changes (a plan's
    quotas, prices or alerts), and every ``seconds`` as a safety net behind the
    recompiles a rule change or a plan change does at once."""
    while True:
        changed.clear()
        with surviving(log, "alerts compile failed"):  # the next pass picks up from here
            count = await compiler.everyone()
            log.debug("alerts compiled", customers=count)
        await wait_set(changed, seconds)


async def _mirror(pool: AsyncConnectionPool, api: stripe.StripeClient) -> None:
    report = await stripe_mirror.sync(pool, api)
    if report.changed:
        log.info("stripe sync", report=report)


async def _bill_recent(billing: BillingRun) -> None:
    """Corrections of finalized invoices first: the runs then carry their charges."""
    if corrected := await billing.correct_finalized():
        log.info("finalized invoices corrected", corrections=corrected)
    today = datetime.now(UTC).date()
    for back in RECENT:
        report = await billing.run(months_before(today, back))
        if report.written:
            log.info("billing run", period=report.period, written=report.written)


async def _every(job: Callable[[], Awaitable[None]], name: str, seconds: float) -> None:
    while True:
        with surviving(log, f"{name} failed"):  # the next pass picks up where this one failed
            await job()
        await asyncio.sleep(seconds)
