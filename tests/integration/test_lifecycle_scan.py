"""The lifecycle scan and the billing run's invoice.finalized: each notification lands on
the stream once, with its data, and nothing for what is not due."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from schemas.notifications import NotificationType, notification_id
from services.api.accounts import store
from services.billing import service as billing
from services.billing.invoicing.run import BillingRun
from services.billing.notification.lifecycle import LifecycleScan
from services.runtime import Runtime
from tests.billing_support import at, record_usage, subscribe
from tests.notification_support import published

TRIAL = NotificationType.TRIAL_ENDING
KEY = NotificationType.API_KEY_EXPIRING
FINALIZED = NotificationType.INVOICE_FINALIZED


def _no_clickhouse():
    raise AssertionError("the default catalog prices no distinct-count meter")


def scan(pool, redis, now: datetime) -> LifecycleScan:
    return LifecycleScan(pool, redis, timedelta(days=3), timedelta(days=7), clock=lambda: now)


def z(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


async def test_a_trial_ending_within_three_days_is_told_once(pool, redis, tenant) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    ends = now + timedelta(days=2)
    since = now - timedelta(days=12)
    await subscribe(pool, f"{tenant}-soon", "pro", since, "trial", trial_ends_at=ends)
    await subscribe(pool, f"{tenant}-later", "pro", since, "trial", now + timedelta(days=5))
    await subscribe(pool, f"{tenant}-over", "pro", since, "trial", now - timedelta(hours=1))
    await subscribe(pool, f"{tenant}-none", "pro", since)  # active, never on trial

    first = await scan(pool, redis, now).run()
    again = await scan(pool, redis, now + timedelta(minutes=1)).run()

    [told] = await published(redis, tenant)
    assert first.trials >= 1 and again.trials == 0
    assert told.type is TRIAL
    assert told.id == notification_id(TRIAL, f"{tenant}-soon", z(ends))
    assert told.data == {"customer": f"{tenant}-soon", "plan": "pro", "trial_ends_at": z(ends)}


async def test_a_key_expiring_within_seven_days_is_told_once(pool, redis, tenant, settings) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    customer = f"{tenant}-keys"
    await subscribe(pool, customer, "pro", now - timedelta(days=30))
    expires = now + timedelta(days=3)
    async with pool.connection() as conn:
        soon, _ = await store.issue_key(
            conn, customer, settings.pepper, "test", name="ci", expires_at=expires
        )
        await store.issue_key(
            conn, customer, settings.pepper, "test", expires_at=now + timedelta(days=10)
        )
        await store.issue_key(conn, customer, settings.pepper, "test")  # never expires
        gone, _ = await store.issue_key(conn, customer, settings.pepper, "test", expires_at=expires)
        await store.revoke_key(conn, gone, "test")
        await store.issue_key(
            conn, customer, settings.pepper, "test", expires_at=now - timedelta(hours=1)
        )  # already expired

    await scan(pool, redis, now).run()
    await scan(pool, redis, now + timedelta(minutes=1)).run()

    [told] = await published(redis, tenant)
    assert told.type is KEY
    assert told.id == notification_id(KEY, customer, soon.id, z(expires))
    assert told.data == {
        "customer": customer,
        "key_id": soon.id,
        "name": "ci",
        "expires_at": z(expires),
    }


async def test_a_finalized_invoice_is_told_once_and_a_lost_one_by_the_scan(
    pool, redis, tenant
) -> None:
    told_by_run, lost = f"{tenant}-told", f"{tenant}-lost"
    await subscribe(pool, told_by_run, "starter", at("2019-04-05"))
    await record_usage(pool, told_by_run, "api_calls", date(2019, 5, 7), 50_010)
    await subscribe(pool, lost, "starter", at("2019-06-01"))
    await record_usage(pool, lost, "api_calls", date(2019, 6, 7), 10)

    telling = BillingRun(pool, _no_clickhouse, timedelta(hours=1), redis=redis)
    await telling.run(date(2019, 5, 1), now=at("2019-07-02"), finalize=True)
    await telling.run(date(2019, 5, 1), now=at("2019-07-02"), finalize=True)  # no change
    [told] = await published(redis, tenant)
    invoice_id = await _invoice_id(pool, told_by_run, "2019-05")
    assert told.type is FINALIZED
    assert told.id == notification_id(FINALIZED, told_by_run, invoice_id)
    assert told.data == {
        "customer": told_by_run,
        "invoice_id": invoice_id,
        "period": {"start": "2019-05-01T00:00:00Z", "end": "2019-06-01T00:00:00Z"},
        "total": "49.01",  # the fee, and 10 calls beyond the 50,000 included at $0.001
        "currency": "usd",
    }

    # A run that finalizes but never publishes: a crash between its commit and XADD.
    silent = BillingRun(pool, _no_clickhouse, timedelta(hours=1))
    await silent.run(date(2019, 6, 1), now=at("2019-07-02"), finalize=True)
    assert len(await published(redis, tenant)) == 1
    now = datetime.now(UTC)
    first = await scan(pool, redis, now).run()
    await scan(pool, redis, now + timedelta(minutes=1)).run()

    found = {(n.customer, n.data["invoice_id"]) for n in await published(redis, tenant)}
    assert len(await published(redis, tenant)) == len(found) == 3
    assert found == {
        (told_by_run, invoice_id),
        (told_by_run, await _invoice_id(pool, told_by_run, "2019-06")),
        (lost, await _invoice_id(pool, lost, "2019-06")),
    }
    assert first.invoices >= 2


async def _invoice_id(pool, customer: str, period: str) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM invoices WHERE customer_id = %s AND period = %s AND status ="
            " 'finalized'",
            (customer, period),
        )
        [row] = await cur.fetchall()
    return str(row[0])


async def test_the_billing_service_runs_the_lifecycle_jobs(settings, pool, redis, tenant) -> None:
    """The service's schedule: its pass tells what the jobs find, with its settings."""
    now = datetime.now(UTC).replace(microsecond=0)
    ends = now + timedelta(hours=30)
    customer = f"{tenant}-svc"
    await subscribe(pool, customer, "pro", now - timedelta(days=3), "trial", trial_ends_at=ends)
    settings = settings.model_copy(update={"trial_ending_days": 2})
    async with Runtime(settings) as runtime:
        runtime_pool = await runtime.pool()
        warning, lifecycle = billing.lifecycle_jobs(runtime, runtime_pool)
        await billing.lifecycle_pass(warning, lifecycle, runtime_pool, runtime.redis())
    [told] = await published(redis, tenant)
    assert told.type is TRIAL and told.data["trial_ends_at"] == z(ends)
