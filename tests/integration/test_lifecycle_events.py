"""Lifecycle notifications decided by a request: quota exhausted (enforcement and
leases), plan changed (admin, Stripe, trial end), payment failed (Stripe).  Each lands
on the notification stream once; what is not one of them lands nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from psycopg.types.json import Jsonb
from redis.asyncio import Redis

from schemas.events import utcnow
from schemas.notifications import Notification, NotificationType, notification_id
from services.api.enforcement.exhaustion import Exhaustion
from services.api.enforcement.limiter import Code, Limit, Outcome
from services.api.enforcement.trials import end_trial
from services.billing.stripe import notices
from services.common.settings import Settings
from tests.accounts_support import ADMIN, enforce, running_api, sign_up
from tests.billing_support import at, subscribe
from tests.integration.test_enforcement import set_usage
from tests.integration.test_stripe import link, post, webhook_client
from tests.notification_support import published

EXHAUSTED = NotificationType.QUOTA_EXHAUSTED
CHANGED = NotificationType.PLAN_CHANGED
FAILED = NotificationType.PAYMENT_FAILED


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings) as client:
        yield client


async def settled(redis: Redis, customer: str, count: int) -> list[Notification]:
    """The customer's notifications once ``count`` arrived (publishing is in the
    background), and a moment more so an extra one would show."""
    for _ in range(100):
        found = await published(redis, customer)
        if len(found) >= count:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    return await published(redis, customer)


def month() -> tuple[str, str]:
    now = utcnow()
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return (z(start), z(end))


def z(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


async def test_the_first_hard_quota_refusal_is_told_once(api, redis) -> None:
    account = await sign_up(api, "free")
    await set_usage(redis, account.customer, 1000)
    refusals = [await enforce(api, account) for _ in range(3)]
    assert [r.status_code for r in refusals] == [429] * 3
    lease = await api.post(
        "/v1/leases", json={"meter": "api_calls", "want": 5}, headers=account.auth
    )
    assert lease.status_code == 429  # leases are refused by the same quota: still once

    [told] = await settled(redis, account.customer, 1)
    start, end = month()
    assert told.type is EXHAUSTED
    assert told.id == notification_id(EXHAUSTED, account.customer, "api_calls", start)
    assert told.data == {
        "customer": account.customer,
        "meter": "api_calls",
        "period": {"start": start, "end": end},
        "limit": "1000",
    }


async def test_a_lease_refused_by_a_hard_quota_is_told(api, redis) -> None:
    account = await sign_up(api, "free")
    await set_usage(redis, account.customer, 1000)
    lease = await api.post(
        "/v1/leases", json={"meter": "api_calls", "want": 5}, headers=account.auth
    )
    assert lease.status_code == 429
    [told] = await settled(redis, account.customer, 1)
    assert told.type is EXHAUSTED


async def test_soft_quotas_and_rate_limits_tell_nothing(api, redis) -> None:
    soft = await sign_up(api, "starter")  # soft quota of 50,000: over it is billed
    await set_usage(redis, soft.customer, 60_000)
    assert (await enforce(api, soft)).status_code == 200
    rated = await sign_up(api, "free")  # 10 a minute
    replies = [await enforce(api, rated) for _ in range(12)]
    assert replies[-1].status_code == 429 and replies[-1].json()["policy"] == "free-per-minute"
    assert await settled(redis, soft.customer, 1) == []
    assert await published(redis, rated.customer) == []


async def test_an_admin_plan_change_is_told_once(api, redis) -> None:
    account = await sign_up(api, "free")
    path = f"/v1/admin/customers/{account.customer}"
    moved = await api.patch(path, json={"plan": "pro"}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    same = await api.patch(path, json={"plan": "pro"}, headers=ADMIN)  # no change: no news
    assert same.status_code == 200
    status_only = await api.patch(path, json={"status": "active"}, headers=ADMIN)
    assert status_only.status_code == 200

    [told] = await published(redis, account.customer)
    assert told.type is CHANGED
    assert told.data == {
        "customer": account.customer,
        "from_plan": "free",
        "to_plan": "pro",
        "source": "admin",
    }


async def test_a_trial_that_runs_out_is_told_as_a_plan_change(
    settings, pool, redis, tenant
) -> None:
    customer = f"{tenant}-trial"
    ended = datetime.now(UTC) - timedelta(minutes=5)
    await subscribe(pool, customer, "pro", at("2026-01-01"), "trial", trial_ends_at=ended)
    await end_trial(settings, redis, pool, customer)
    await end_trial(settings, redis, pool, customer)  # already ended: nothing more
    [told] = await published(redis, customer)
    assert told.data == {
        "customer": customer,
        "from_plan": "pro",
        "to_plan": "free",
        "source": "trial_end",
    }

    suspended = f"{tenant}-suspended"  # suspended, not moved: no plan change
    await subscribe(pool, suspended, "pro", at("2026-01-01"), "trial", trial_ends_at=ended)
    quiet = settings.model_copy(update={"trial_expiry": "suspend"})
    await end_trial(quiet, redis, pool, suspended)
    assert await published(redis, suspended) == []


async def test_stripe_payment_failed_and_plan_change_are_told_once(
    settings, pool, redis, tenant
) -> None:
    customer = f"{tenant}-stripe"
    await subscribe(pool, customer, "pro", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}")
    invoice = {
        "id": "in_9",
        "object": "invoice",
        "customer": f"cus_{tenant}",
        "metadata": {"tally_invoice": "inv_abc"},
        "amount_due": 19900,
        "currency": "usd",
        "attempt_count": 1,
    }
    switched = {
        "id": "sub_9",
        "object": "subscription",
        "customer": f"cus_{tenant}",
        "status": "active",
        "items": {"data": [{"price": {"id": "p", "metadata": {"tally_plan": "starter"}}}]},
    }
    now = int(time.time())
    async with webhook_client(settings, pool, redis) as client:
        failed, failed_id = await post(client, "invoice.payment_failed", invoice, created=now)
        assert failed.json()["outcome"] == "applied: pro, past_due"
        replay, _ = await post(
            client, "invoice.payment_failed", invoice, created=now, event_id=failed_id
        )
        assert replay.json()["outcome"] == "duplicate"
        moved, moved_id = await post(
            client, "customer.subscription.updated", switched, created=now + 10
        )
        assert moved.json()["outcome"] == "applied: starter, active"
        stale, _ = await post(
            client,
            "customer.subscription.updated",
            switched | {"status": "past_due"},
            created=now + 5,
        )
        assert stale.json()["outcome"].startswith("stale")

    payment, change = await published(redis, customer)
    assert payment.id == notification_id(FAILED, customer, failed_id)
    assert payment.data == {
        "customer": customer,
        "invoice_id": "inv_abc",
        "stripe_invoice_id": "in_9",
        "amount_due": "199.00",
        "currency": "usd",
        "status": "past_due",
        "attempt_count": 1,
        "hosted_invoice_url": None,
    }
    assert change.id == notification_id(CHANGED, customer, moved_id)
    assert change.data == {
        "customer": customer,
        "from_plan": "pro",
        "to_plan": "starter",
        "source": "stripe",
    }


async def test_a_failed_payment_lost_before_its_publish_is_told_by_the_next_pass(
    pool, redis, tenant
) -> None:
    customer = f"{tenant}-lost"
    await subscribe(pool, customer, "pro", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}l")
    created = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    event = {
        "id": f"evt_{tenant}",
        "type": "invoice.payment_failed",
        "created": int(created.timestamp()),
        "data": {
            "object": {
                "id": "in_7",
                "customer": f"cus_{tenant}l",
                "amount_due": 4900,
                "currency": "usd",
            }
        },
    }
    async with pool.connection() as conn:  # applied and committed; the process died then
        await conn.execute(
            "INSERT INTO stripe_inbox (event_id, type, created, outcome, payload)"
            " VALUES (%s, 'invoice.payment_failed', %s, 'applied: pro, past_due', %s)",
            (event["id"], created, Jsonb(event)),
        )
        assert await notices.retell(conn, redis, datetime.now(UTC)) >= 1
        assert await notices.retell(conn, redis, datetime.now(UTC)) == 0

    [told] = await published(redis, customer)
    assert told.id == notification_id(FAILED, customer, event["id"])
    assert told.occurred_at == created
    assert (told.data["amount_due"], told.data["invoice_id"]) == ("49.00", None)


async def test_a_publish_that_fails_never_fails_the_refusal_and_is_tried_again() -> None:
    unreachable = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    exhaustion = Exhaustion(unreachable)
    quota = Limit("quota:api_calls", "quota", Decimal(1000), Decimal(0), 1, 1, 1, hard=True)
    refused = Outcome(Code.REFUSED, limits=(quota,), violated=quota)
    try:
        exhaustion.refused("cus_nowhere", refused, utcnow())  # returns at once
        assert exhaustion.pending == 1
        await exhaustion.drain()  # the publish failed: logged, not raised
        exhaustion.refused("cus_nowhere", refused, utcnow())  # so the next refusal retries
        assert exhaustion.pending == 1
        await exhaustion.drain()
    finally:
        await unreachable.aclose()
