"""Stripe through the real SDK against the fake server: usage pushed exactly once through
429s and a crash between send and commit, corrections outside Stripe's window, the v2
stream, and webhooks that are verified, de-duplicated and applied in order."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from schemas import redis_keys
from services.api.accounts.projection_lock import lock_projection
from services.billing.invoicing.run import BillingRun
from services.billing.stripe import outbox, unsent
from services.billing.stripe.outbox import MeterPusher
from tests.billing_support import (
    WEBHOOK_SECRET as SECRET,
)
from tests.billing_support import (
    at,
    invoice_of,
    record_usage,
    stripe_app,
    subscribe,
)
from tests.fake_stripe import FakeStripe, sign_webhook, webhook_event


def no_clickhouse() -> Any:
    raise AssertionError("no distinct-count meter is priced")


@pytest.fixture(scope="module")
def fake(fake_stripe: FakeStripe) -> FakeStripe:
    return fake_stripe


async def outbox_rows(pool: Any, customer: str) -> list[tuple[str, int, str]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT identifier, quantity, state FROM stripe_outbox WHERE customer_id = %s"
            " ORDER BY id",
            (customer,),
        )
        return [(i, int(q), s) for i, q, s in await cur.fetchall()]


async def enqueue(pool: Any, customer: str) -> None:
    """Queue usage changes, keeping only ``customer``'s: other tests' usage in the shared
    database would otherwise be pushed (and take the injected failures) first."""
    await outbox.enqueue(pool)
    async with pool.connection() as conn:
        await conn.execute(
            "DELETE FROM stripe_outbox WHERE customer_id <> %s AND state = 'pending'", (customer,)
        )


async def due_now(pool: Any) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE stripe_outbox SET next_attempt_at = now() WHERE state = 'pending'"
        )


async def test_usage_reaches_stripe_exactly_once(pool, tenant, fake, monkeypatch) -> None:
    customer, today = f"{tenant}-meter", datetime.now(UTC).date()
    await subscribe(pool, customer, "starter", at("2026-01-01"))
    await record_usage(pool, customer, "api_calls", today, 120)
    pusher = MeterPusher(pool, fake.client())

    await enqueue(pool, customer)
    identifier = f"tally:{customer}:api_calls:{today}:1"
    assert await outbox_rows(pool, customer) == [(identifier, 120, "pending")]

    fake.fail_next("/v1/billing/meter_events", 429)
    assert (await pusher.push()).retrying >= 1
    assert await outbox_rows(pool, customer) == [(identifier, 120, "pending")]
    await due_now(pool)
    await pusher.push()
    assert await outbox_rows(pool, customer) == [(identifier, 120, "sent")]
    [stripe_customer] = [c for c in fake.customers.values() if c["email"].startswith(customer)]
    assert fake.meter_total("tally_api_calls", stripe_customer["id"]) == 120
    [sent] = [e for e in fake.meter_events if e.identifier == identifier]
    assert sent.payload == {"stripe_customer_id": stripe_customer["id"], "value": "120"}
    assert datetime.fromtimestamp(sent.timestamp, UTC).date() == today

    # Late events raise the day to 150: revision 2 carries the difference.
    await record_usage(pool, customer, "api_calls", today, 150)
    await enqueue(pool, customer)
    await enqueue(pool, customer)  # nothing changed since: nothing more is queued
    assert await outbox_rows(pool, customer) == [
        (identifier, 120, "sent"),
        (f"tally:{customer}:api_calls:{today}:2", 30, "pending"),
    ]

    # The pusher dies after Stripe took the event but before the outbox recorded it.
    real_settle = outbox._settle

    async def killed(*args, **kwargs):
        raise SystemExit("killed between send and commit")

    monkeypatch.setattr(outbox, "_settle", killed)
    with pytest.raises(SystemExit):
        await pusher.push()
    monkeypatch.setattr(outbox, "_settle", real_settle)
    assert (await outbox_rows(pool, customer))[-1][2] == "pending"
    await pusher.push()  # resends the same identifier; Stripe refuses the duplicate
    assert [s for *_, s in await outbox_rows(pool, customer)] == ["sent", "sent"]
    assert fake.meter_total("tally_api_calls", stripe_customer["id"]) == 150


async def test_corrections_stripe_cannot_take_become_adjustments(pool, tenant, fake) -> None:
    customer, today = f"{tenant}-adjust", datetime.now(UTC).date()
    await subscribe(pool, customer, "starter", at("2026-01-01"))
    await record_usage(pool, customer, "api_calls", today - timedelta(days=40), 500)
    await record_usage(pool, customer, "api_calls", today, 80)
    await enqueue(pool, customer)
    await MeterPusher(pool, fake.client()).push()
    async with pool.connection() as conn:  # sent more than Stripe's 24 hours ago
        await conn.execute(
            "UPDATE stripe_outbox SET sent_at = now() - interval '25 hours' WHERE customer_id = %s",
            (customer,),
        )
    await record_usage(pool, customer, "api_calls", today, 70)  # usage corrected downwards
    await enqueue(pool, customer)
    states = [(q, s) for _, q, s in await outbox_rows(pool, customer)]
    assert sorted(states) == [(-10, "adjustment"), (80, "sent"), (500, "adjustment")]


async def test_a_day_lowered_within_24_hours_is_cancelled_and_sent_again(
    pool, tenant, fake
) -> None:
    customer, today = f"{tenant}-cancel", datetime.now(UTC).date()
    await subscribe(pool, customer, "starter", at("2026-01-01"))
    pusher = MeterPusher(pool, fake.client())
    await record_usage(pool, customer, "api_calls", today, 80)
    await enqueue(pool, customer)
    await pusher.push()
    await record_usage(pool, customer, "api_calls", today, 95)
    await enqueue(pool, customer)
    await pusher.push()
    [stripe_customer] = [c for c in fake.customers.values() if c["email"].startswith(customer)]
    assert fake.meter_total("tally_api_calls", stripe_customer["id"]) == 95

    await record_usage(pool, customer, "api_calls", today, 70)  # corrected down by 25
    await enqueue(pool, customer)
    first, second, third = (f"tally:{customer}:api_calls:{today}:{n}" for n in (1, 2, 3))
    assert await outbox_rows(pool, customer) == [
        (first, 80, "sent"),
        (second, 15, "sent"),
        (third, 70, "pending"),  # the whole day, once both are cancelled
    ]
    report = await pusher.push()
    assert (report.cancelled, report.sent) == (2, 1)
    assert await outbox_rows(pool, customer) == [
        (first, 80, "cancelled"),
        (second, 15, "cancelled"),
        (third, 70, "sent"),
    ]
    assert fake.meter_total("tally_api_calls", stripe_customer["id"]) == 70
    assert {e.identifier for e in fake.cancelled_meter_events} >= {first, second}


async def test_the_v2_meter_event_stream(pool, tenant, fake) -> None:
    customer, today = f"{tenant}-stream", datetime.now(UTC).date()
    await subscribe(pool, customer, "starter", at("2026-01-01"))
    await record_usage(pool, customer, "compute_seconds", today, "7.9")  # whole units only
    await enqueue(pool, customer)
    await MeterPusher(pool, fake.client(), stream=True).push()
    [event] = [e for e in fake.meter_events if e.identifier.startswith(f"tally:{customer}:")]
    assert (event.via, event.payload["value"]) == ("stream", "7")
    assert not [e for e in fake.meter_event_errors if e.identifier == event.identifier]


# --- webhooks -----------------------------------------------------------------------


def webhook_client(settings: Any, pool: Any, redis: Any) -> httpx.AsyncClient:
    return stripe_app(settings, pool, redis, None)


async def post(
    client: httpx.AsyncClient,
    kind: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
    secret: str = SECRET,
    signed_at: int | None = None,
) -> tuple[httpx.Response, str]:
    body = webhook_event(kind, obj, id=event_id, created=created)
    signature = sign_webhook(body, secret, signed_at)
    reply = await client.post(
        "/v1/stripe/webhook", content=body, headers={"Stripe-Signature": signature}
    )
    return reply, orjson.loads(body)["id"]


async def link(pool: Any, customer: str, stripe_customer: str) -> None:
    """The customer as already known to Stripe."""
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO stripe_objects (kind, key, stripe_id) VALUES ('customer', %s, %s)",
            (customer, stripe_customer),
        )


async def account(pool: Any, customer: str) -> Any:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT plan_id, status FROM customers WHERE id = %s", (customer,))
        return await cur.fetchone()


async def test_webhooks_verified_deduplicated_and_in_order(settings, pool, redis, tenant) -> None:
    customer = f"{tenant}-hook"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}")
    await redis.set(redis_keys.account(customer), "stale projection")
    checkout = {
        "id": "cs_1",
        "object": "checkout.session",
        "client_reference_id": customer,
        "customer": f"cus_{tenant}",
        "payment_status": "paid",
        "metadata": {"plan": "pro"},
    }
    async with webhook_client(settings, pool, redis) as client:
        forged, _ = await post(client, "checkout.session.completed", checkout, secret="whsec_other")
        stale, _ = await post(
            client, "checkout.session.completed", checkout, signed_at=int(time.time()) - 301
        )
        unsigned = await client.post("/v1/stripe/webhook", content=b"{}")
        assert [forged.status_code, stale.status_code, unsigned.status_code] == [400, 400, 400]
        for body, problem in [(b"not json", "not-an-event"), (b'{"id": "evt_1"}', "not-an-event")]:
            signed = {"Stripe-Signature": sign_webhook(body, SECRET)}
            reply = await client.post("/v1/stripe/webhook", content=body, headers=signed)
            assert reply.status_code == 400 and reply.json()["type"].endswith(problem)
        assert forged.headers["content-type"] == "application/problem+json"
        assert await account(pool, customer) == ("free", "active")

        now = int(time.time())
        ok, event_id = await post(client, "checkout.session.completed", checkout, created=now)
        assert ok.status_code == 200 and ok.json()["outcome"] == "applied: pro, active"
        assert await redis.get(redis_keys.account(customer)) is None  # enforcement re-reads
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE customers SET plan_id = 'starter' WHERE id = %s", (customer,)
            )
        replay, _ = await post(
            client, "checkout.session.completed", checkout, created=now, event_id=event_id
        )
        assert replay.json()["outcome"] == "duplicate"
        assert await account(pool, customer) == ("starter", "active")

        subscription = {
            "id": "sub_1",
            "object": "subscription",
            "customer": f"cus_{tenant}",
            "status": "active",
            "metadata": {"plan": "enterprise"},
        }
        deleted, _ = await post(
            client, "customer.subscription.deleted", subscription, created=now + 20
        )
        late, _ = await post(
            client, "customer.subscription.updated", subscription, created=now + 10
        )
        assert deleted.json()["outcome"] == "applied: free, active"
        assert late.json()["outcome"].startswith("stale")
        assert await account(pool, customer) == ("free", "active")

        # A plan switched in the billing portal: the prices say which plan it is now.
        switched = subscription | {
            "metadata": {"plan": "pro"},
            "items": {
                "data": [{"price": {"id": "price_x", "metadata": {"tally_plan": "starter"}}}]
            },
        }
        moved, _ = await post(client, "customer.subscription.updated", switched, created=now + 30)
        assert moved.json()["outcome"] == "applied: starter, active"


async def test_a_webhook_drops_the_projection_after_one_in_flight(
    settings, pool, redis, tenant, database_url
) -> None:
    """A decision projecting on demand read the row before the webhook's change; its
    copy must not outlive the webhook's drop."""
    customer = f"{tenant}-race"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}r")
    checkout = {
        "id": "cs_2",
        "object": "checkout.session",
        "client_reference_id": customer,
        "customer": f"cus_{tenant}r",
        "payment_status": "paid",
        "metadata": {"plan": "pro"},
    }
    in_flight = await psycopg.AsyncConnection.connect(database_url)
    async with webhook_client(settings, pool, redis) as client:
        async with in_flight, in_flight.transaction():
            await lock_projection(in_flight, customer)
            hook = asyncio.create_task(post(client, "checkout.session.completed", checkout))
            await asyncio.sleep(0.3)
            assert not hook.done()  # it waits to commit until the projection is written
            await redis.hset(redis_keys.account(customer), mapping={"plan": "free"})
        reply, _ = await hook
    assert reply.json()["outcome"] == "applied: pro, active"
    assert await redis.exists(redis_keys.account(customer)) == 0  # re-projected when next used


async def test_invoice_payment_webhooks(settings, pool, redis, tenant) -> None:
    from services.billing.invoicing.run import BillingRun

    customer = f"{tenant}-pay"
    await subscribe(pool, customer, "pro", at("2021-01-01"))
    await link(pool, customer, f"cus_{tenant}p")
    await record_usage(pool, customer, "api_calls", date(2021, 3, 3), 1)
    await BillingRun(pool, no_clickhouse, timedelta(hours=1)).run(
        date(2021, 3, 1), now=at("2021-04-02"), finalize=True
    )
    invoice = await invoice_of(pool, customer)
    obj = {
        "id": "in_1",
        "object": "invoice",
        "customer": f"cus_{tenant}p",
        "metadata": {"tally_invoice": invoice.id},
        "amount_due": 19900,
    }
    now = int(time.time())
    async with webhook_client(settings, pool, redis) as client:
        failed, _ = await post(client, "invoice.payment_failed", obj, created=now)
        assert failed.json()["outcome"] == "applied: pro, past_due"
        assert (await invoice_of(pool, customer)).status == "payment_failed"
        paid, _ = await post(client, "invoice.paid", obj, created=now + 5)
        assert paid.json()["outcome"] == "applied: pro, active"
    paid_invoice = await invoice_of(pool, customer)
    assert (paid_invoice.status, paid_invoice.total) == ("paid", Decimal("199.00"))


def checkout_session(customer: str, stripe_customer: str, payment_status: str) -> dict[str, Any]:
    """A Checkout session as Tally opens it, in the state Stripe reports."""
    return {
        "id": f"cs_{customer}",
        "object": "checkout.session",
        "client_reference_id": customer,
        "customer": stripe_customer,
        "mode": "subscription",
        "payment_status": payment_status,
        "metadata": {"plan": "pro", "tally_customer": customer},
    }


async def inbox_outcome(pool: Any, event_id: str) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT outcome FROM stripe_inbox WHERE event_id = %s", (event_id,)
        )
        [outcome] = await cur.fetchone()
        return str(outcome)


async def test_an_unpaid_checkout_upgrades_only_once_paid(settings, pool, redis, tenant) -> None:
    """A Checkout paid by a delayed method (bank debit) completes unpaid: the plan waits
    for ``async_payment_succeeded``; ``async_payment_failed`` changes nothing."""
    customer = f"{tenant}-unpaid"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}u")
    session = checkout_session(customer, f"cus_{tenant}u", "unpaid")
    now = int(time.time())
    async with webhook_client(settings, pool, redis) as client:
        completed, completed_id = await post(
            client, "checkout.session.completed", session, created=now
        )
        assert completed.status_code == 200
        assert await account(pool, customer) == ("free", "active")
        assert completed.json()["outcome"] == await inbox_outcome(pool, completed_id)
        assert completed.json()["outcome"].startswith("acknowledged: ")

        failed, failed_id = await post(
            client, "checkout.session.async_payment_failed", session, created=now + 1
        )
        assert failed.status_code == 200
        assert await account(pool, customer) == ("free", "active")
        assert failed.json()["outcome"] == await inbox_outcome(pool, failed_id)
        assert failed.json()["outcome"].startswith("acknowledged: ")

        retried = session | {"id": f"cs_{customer}_2"}
        await post(client, "checkout.session.completed", retried, created=now + 2)
        assert await account(pool, customer) == ("free", "active")
        await redis.set(redis_keys.account(customer), "stale projection")
        paid, _ = await post(
            client,
            "checkout.session.async_payment_succeeded",
            retried | {"payment_status": "paid"},
            created=now + 3,
        )
        assert paid.json()["outcome"] == "applied: pro, active"
        assert await account(pool, customer) == ("pro", "active")
        assert await redis.get(redis_keys.account(customer)) is None


@pytest.mark.parametrize("payment_status", ["paid", "no_payment_required"])
async def test_a_paid_checkout_upgrades_at_once(
    settings, pool, redis, tenant, payment_status
) -> None:
    customer = f"{tenant}-{payment_status}"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}{payment_status}")
    session = checkout_session(customer, f"cus_{tenant}{payment_status}", payment_status)
    async with webhook_client(settings, pool, redis) as client:
        reply, _ = await post(client, "checkout.session.completed", session)
    assert reply.json()["outcome"] == "applied: pro, active"
    assert await account(pool, customer) == ("pro", "active")


async def test_an_incomplete_subscription_upgrades_no_one(settings, pool, redis, tenant) -> None:
    """The subscription an unpaid Checkout made is ``incomplete`` (then
    ``incomplete_expired``): it was never paid, so its plan is not the customer's."""
    customer = f"{tenant}-incomplete"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}i")
    subscription = {
        "id": f"sub_{tenant}i",
        "object": "subscription",
        "customer": f"cus_{tenant}i",
        "metadata": {"plan": "pro"},
        "items": {"data": [{"price": {"id": "price_p", "metadata": {"tally_plan": "pro"}}}]},
    }
    now = int(time.time())
    async with webhook_client(settings, pool, redis) as client:
        for offset, status in enumerate(["incomplete", "incomplete_expired"]):
            reply, _ = await post(
                client,
                "customer.subscription.updated",
                subscription | {"status": status},
                created=now + offset,
            )
            assert reply.status_code == 200
            assert await account(pool, customer) == ("free", "active"), status
        active, _ = await post(
            client,
            "customer.subscription.updated",
            subscription | {"status": "active"},
            created=now + 5,
        )
    assert active.json()["outcome"] == "applied: pro, active"


async def test_the_first_invoice_paid_applies_the_subscribed_plan(
    settings, pool, redis, tenant
) -> None:
    """``invoice.paid`` for the invoice that created the subscription: the plan comes from
    the subscription as ``customer.subscription.updated`` reads it (its prices'
    ``tally_plan``, else its metadata), here as Stripe puts it on the invoice."""
    now = int(time.time())
    shapes = {
        # API 2025-03-31 and later: the subscription's metadata under parent.
        "parent": {
            "parent": {
                "type": "subscription_details",
                "subscription_details": {
                    "subscription": f"sub_{tenant}",
                    "metadata": {"plan": "pro"},
                },
            }
        },
        # The subscription expanded, its prices naming the plan.
        "expanded": {
            "subscription": {
                "id": f"sub_{tenant}",
                "object": "subscription",
                "metadata": {"plan": "starter"},
                "items": {
                    "data": [{"price": {"id": "price_p", "metadata": {"tally_plan": "pro"}}}]
                },
            }
        },
    }
    async with webhook_client(settings, pool, redis) as client:
        for shape, fields in shapes.items():
            customer = f"{tenant}-first-{shape}"
            await subscribe(pool, customer, "free", at("2026-01-01"))
            await link(pool, customer, f"cus_{tenant}{shape}")
            invoice = {
                "id": f"in_{tenant}{shape}",
                "object": "invoice",
                "customer": f"cus_{tenant}{shape}",
                "billing_reason": "subscription_create",
                "metadata": {},
                **fields,
            }
            renewal = invoice | {
                "id": f"in_{tenant}{shape}r",
                "billing_reason": "subscription_cycle",
            }
            renewed, _ = await post(client, "invoice.paid", renewal, created=now)
            assert renewed.json()["outcome"] == "applied: invoice paid", shape  # not the first
            paid, _ = await post(client, "invoice.paid", invoice, created=now + 1)
            assert paid.json()["outcome"] == "applied: pro, active", shape
            assert await account(pool, customer) == ("pro", "active"), shape


async def test_a_checkout_records_the_stripe_customer_it_made(
    settings, pool, redis, tenant
) -> None:
    """A session on a Stripe customer Tally did not make (a payment link, a pricing
    table): once paid, that Stripe customer's later events reach the Tally customer."""
    customer = f"{tenant}-adopted"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    stripe_customer = f"cus_{tenant}made_by_checkout"
    subscription = {
        "id": f"sub_{tenant}a",
        "object": "subscription",
        "customer": stripe_customer,
        "status": "past_due",
        "metadata": {"plan": "pro"},
    }
    now = int(time.time())
    async with webhook_client(settings, pool, redis) as client:
        completed, _ = await post(
            client,
            "checkout.session.completed",
            checkout_session(customer, stripe_customer, "paid"),
            created=now,
        )
        assert completed.json()["outcome"] == "applied: pro, active"
        updated, _ = await post(
            client, "customer.subscription.updated", subscription, created=now + 1
        )
        assert updated.json()["outcome"] == "applied: pro, past_due"
        recovered, _ = await post(
            client,
            "customer.subscription.updated",
            subscription | {"status": "active"},
            created=now + 2,
        )
        assert recovered.json()["outcome"] == "applied: pro, active"
        invoice = {"id": f"in_{tenant}a", "object": "invoice", "customer": stripe_customer}
        failed, _ = await post(client, "invoice.payment_failed", invoice, created=now + 3)
        assert failed.json()["outcome"] == "applied: pro, past_due"
    assert await account(pool, customer) == ("pro", "past_due")


async def test_a_checkout_for_no_tally_customer_is_acknowledged(
    settings, pool, redis, tenant
) -> None:
    session = checkout_session(f"{tenant}-nobody", f"cus_{tenant}nobody", "paid")
    async with webhook_client(settings, pool, redis) as client:
        reply, _ = await post(client, "checkout.session.completed", session)
    assert reply.status_code == 200
    assert reply.json()["outcome"] == "ignored: no Tally customer"


async def test_only_a_paid_checkout_takes_over_the_stripe_customer(
    settings, pool, redis, tenant
) -> None:
    """The customer already has a Stripe customer (made at sign-up); a session on another
    one takes its place only once paid: the paid subscription lives there."""
    customer = f"{tenant}-moved"
    await subscribe(pool, customer, "free", at("2026-01-01"))
    await link(pool, customer, f"cus_{tenant}signup")
    session = checkout_session(customer, f"cus_{tenant}elsewhere", "unpaid")
    failed = {"id": f"in_{tenant}m", "object": "invoice", "customer": f"cus_{tenant}elsewhere"}
    now = int(time.time())
    async with webhook_client(settings, pool, redis) as client:
        await post(client, "checkout.session.completed", session, created=now)
        ignored, _ = await post(client, "invoice.payment_failed", failed, created=now + 1)
        assert ignored.json()["outcome"] == "ignored: no Tally customer"
        paid, _ = await post(
            client, "checkout.session.async_payment_succeeded", session, created=now + 2
        )
        assert paid.json()["outcome"] == "applied: pro, active"
        applied, _ = await post(client, "invoice.payment_failed", failed, created=now + 3)
        assert applied.json()["outcome"] == "applied: pro, past_due"
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT stripe_id FROM stripe_objects WHERE kind = 'customer' AND key = %s",
            (customer,),
        )
        assert await cur.fetchall() == [(f"cus_{tenant}elsewhere",)]


async def test_usage_stripe_was_not_sent_is_settled_once_the_invoice_is_final(
    pool, tenant, fake, ch
) -> None:
    customer, today = f"{tenant}-unsent", datetime.now(UTC).date()
    await subscribe(pool, customer, "starter", at("2024-01-01"))
    day = today - timedelta(days=10)
    pusher = MeterPusher(pool, fake.client())
    await record_usage(pool, customer, "api_calls", day, 60_000)
    await enqueue(pool, customer)
    await pusher.push()
    async with pool.connection() as conn:  # sent more than Stripe's 24 hours ago
        await conn.execute(
            "UPDATE stripe_outbox SET sent_at = now() - interval '25 hours' WHERE customer_id = %s",
            (customer,),
        )
    await record_usage(pool, customer, "api_calls", day, 52_000)  # lowered: unsent
    await enqueue(pool, customer)
    assert [(q, s) for _, q, s in await outbox_rows(pool, customer)][-1] == (-8_000, "adjustment")

    month = day.replace(day=1)
    async with pool.connection() as conn:  # not a resumption of another test's crashed run
        await conn.execute("DELETE FROM billing_runs WHERE period = %s", (f"{month:%Y-%m}",))
    # Every customer of the shared database with a period starting that month is billed:
    # some are on plans pricing distinct counts, read from ClickHouse.
    run = BillingRun(pool, lambda: ch, timedelta(hours=24))
    await run.run(month, now=at("2999-01-01"), finalize=True)
    final = await invoice_of(pool, customer)
    assert final.total == Decimal("51.00")  # Tally's: 49 + 2,000 x 0.001
    [stripe_customer] = [c for c in fake.customers.values() if c["email"].startswith(customer)]
    paid = fake.add_invoice(stripe_customer["id"], 5_900)  # Stripe's: 49 + 10,000 x 0.001
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE invoices SET stripe_invoice_id = %s WHERE id = %s", (paid, final.id)
        )
    await unsent.settle(pool, fake.client())
    await record_usage(pool, customer, "api_calls", day, 51_000)  # after: a correction's
    await enqueue(pool, customer)
    await unsent.settle(pool, fake.client())  # once per invoice
    notes = [
        n for n in fake.credit_notes.values() if n["metadata"].get("tally_invoice") == final.id
    ]
    assert [(n["invoice"], n["amount"]) for n in notes] == [(paid, 800)]
