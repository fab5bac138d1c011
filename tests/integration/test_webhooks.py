"""Webhooks end to end: endpoints over HTTP, notifications through the Redis stream into
the outbox, delivered to a real HTTP receiver and verified with ``standardwebhooks``."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from standardwebhooks import Webhook

from services.billing.notification.sender import Sender, policy
from services.common.notify import publish
from tests.webhook_support import (
    SERVICE,
    PlainMailer,
    add_endpoint,
    alert,
    eventually,
    invoice,
    new_customer,
    quick,
    receiver,
    running_notifier,
    smtp_inbox,
)


async def deliveries(pool: AsyncConnectionPool, notification_id: str) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT endpoint_id, state, attempts, last_status, last_error"
            " FROM notification_deliveries WHERE notification_id = %s ORDER BY id",
            (notification_id,),
        )
        return await cur.fetchall()


async def test_delivered_signed_and_verified(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        made = await add_endpoint(run.client, rx.url("/ok/a"), customer)
        assert made["secret"].startswith("whsec_") and len(made["secret"]) > 40
        listed = await run.client.get(
            f"/v1/customers/{customer}/webhook-endpoints", headers=SERVICE
        )
        assert listed.status_code == 200
        [shown] = listed.json()["endpoints"]
        assert shown["id"] == made["id"] and "secret" not in shown  # shown once only
        before = (
            REGISTRY.get_sample_value("tally_notifications_total", {"type": "alert.triggered"})
            or 0.0
        )

        n = alert(customer)
        await publish(redis, n)
        [got] = await rx.wait_for("/ok/a")

        verified = Webhook(made["secret"]).verify(got.body, got.headers)
        assert verified["type"] == "alert.triggered"
        assert verified["data"]["customer"] == customer
        assert verified["data"]["threshold"]["value"] == "80"
        assert verified["timestamp"].endswith("Z")
        assert got.headers["webhook-id"] == n.id
        assert got.headers["Content-Type"] == "application/json"
        rows = await eventually(lambda: _settled(pool, n.id))
        assert rows == [(made["id"], "succeeded", 1, 200, None)]
        after = REGISTRY.get_sample_value("tally_notifications_total", {"type": "alert.triggered"})
        assert after == before + 1


async def _settled(pool: AsyncConnectionPool, notification_id: str) -> list[tuple[Any, ...]] | None:
    rows = await deliveries(pool, notification_id)
    return rows if rows and all(r[1] in ("succeeded", "failed") for r in rows) else None


async def test_same_id_twice_is_one_notification(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    seen = []

    async def listener(n) -> None:
        seen.append(n.id)

    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        run.notifier.intake.listen(listener)
        await add_endpoint(run.client, rx.url("/ok/dup"), customer)
        n = alert(customer)
        await publish(redis, n)
        await publish(redis, n)
        await rx.wait_for("/ok/dup")
        await asyncio.sleep(0.5)  # time enough for a second one, if there were one
        assert len(rx.at("/ok/dup")) == 1
        assert len(await deliveries(pool, n.id)) == 1
        assert seen == [n.id]  # listeners hear of a new notification once
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM notifications WHERE id = %s", (n.id,))
            assert (await cur.fetchone())[0] == 1


async def test_seller_endpoints_with_event_filter(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        mine = await add_endpoint(run.client, rx.url("/ok/customer"), customer)
        alerts = await add_endpoint(
            run.client, rx.url("/ok/seller-alerts"), None, ["alert.triggered"]
        )
        invoices = await add_endpoint(
            run.client, rx.url("/ok/seller-invoices"), None, ["invoice.finalized"]
        )
        n = alert(customer)
        await publish(redis, n)
        [to_seller] = await rx.wait_for("/ok/seller-alerts")
        [to_customer] = await rx.wait_for("/ok/customer")
        Webhook(alerts["secret"]).verify(to_seller.body, to_seller.headers)
        Webhook(mine["secret"]).verify(to_customer.body, to_customer.headers)
        assert to_seller.headers["webhook-id"] == to_customer.headers["webhook-id"] == n.id

        bill = invoice(customer)
        await publish(redis, bill)
        [billed] = await rx.wait_for("/ok/seller-invoices")
        Webhook(invoices["secret"]).verify(billed.body, billed.headers)
        await rx.wait_for("/ok/customer", 2)
        assert len(rx.at("/ok/seller-alerts")) == 1  # its filter keeps invoices out
        listed = await run.client.get("/v1/webhook-endpoints", headers=SERVICE)
        assert {e["id"] for e in listed.json()["endpoints"]} >= {alerts["id"], invoices["id"]}
        seen = await run.client.get(f"/v1/notifications/{n.id}", headers=SERVICE)
        assert {d["endpoint_id"] for d in seen.json()["deliveries"]} == {mine["id"], alerts["id"]}


async def test_failing_endpoint_retried_on_schedule_then_failed(
    settings, pool, redis, tenant
) -> None:
    settings = quick(settings, webhook_retry_schedule=[0, 0.3, 0.6])
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        await add_endpoint(run.client, rx.url("/fail/x"), customer)
        labels = {"channel": "webhook", "outcome": "retrying"}
        retried = REGISTRY.get_sample_value("tally_notification_deliveries_total", labels) or 0
        n = alert(customer)
        await publish(redis, n)
        got = await rx.wait_for("/fail/x", 3)
        rows = await eventually(lambda: _settled(pool, n.id))
        assert [r[1:4] for r in rows] == [("failed", 3, 500)]
        assert {g.headers["webhook-id"] for g in got} == {n.id}
        now_retried = REGISTRY.get_sample_value("tally_notification_deliveries_total", labels)
        assert now_retried == retried + 2
        gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
        assert 0.3 * 0.8 - 0.05 <= gaps[0] <= 0.3 * 1.2 + 0.5  # the schedule, with jitter
        assert 0.6 * 0.8 - 0.05 <= gaps[1] <= 0.6 * 1.2 + 0.5
        await asyncio.sleep(1.0)
        assert len(rx.at("/fail/x")) == 3  # no fourth attempt
        log = await run.client.get(f"/v1/notifications/{n.id}", headers=SERVICE)
        [delivery] = log.json()["deliveries"]
        assert [a["status"] for a in delivery["attempt_log"]] == [500, 500, 500]
        assert delivery["attempt_log"][0]["response"] == "fail says 500"
        assert delivery["next_attempt_at"] is None and delivery["state"] == "failed"


async def test_gone_disables_the_endpoint(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        made = await add_endpoint(run.client, rx.url("/gone/x"), customer)
        n = alert(customer)
        await publish(redis, n)
        await rx.wait_for("/gone/x")
        rows = await eventually(lambda: _settled(pool, n.id))
        assert [r[1:4] for r in rows] == [("failed", 1, 410)]
        listed = await run.client.get(
            f"/v1/customers/{customer}/webhook-endpoints", headers=SERVICE
        )
        [shown] = listed.json()["endpoints"]
        assert shown["id"] == made["id"] and shown["disabled"]
        assert "410" in shown["disabled_reason"]
        later = alert(customer, usage=900)
        await publish(redis, later)
        await eventually(lambda: _stored(pool, later.id))
        await asyncio.sleep(0.3)
        assert await deliveries(pool, later.id) == []  # a disabled endpoint gets nothing
        assert len(rx.at("/gone/x")) == 1


async def _stored(pool, notification_id: str) -> bool:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT 1 FROM notifications WHERE id = %s", (notification_id,))
        return await cur.fetchone() is not None


async def test_hanging_endpoint_does_not_delay_another_customer(
    settings, pool, redis, tenant
) -> None:
    settings = quick(
        settings, webhook_timeout_seconds=5.0, webhook_concurrency=8, webhook_per_endpoint=2
    )
    slow, fast = await new_customer(pool, tenant), await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        await add_endpoint(run.client, rx.url("/hang/slow"), slow)
        await add_endpoint(run.client, rx.url("/ok/fast"), fast)
        for usage in range(20):
            await publish(redis, alert(slow, usage=usage))
        await rx.wait_for("/hang/slow", 2)
        await asyncio.sleep(0.3)
        assert len(rx.at("/hang/slow")) == 2  # at most per_endpoint in flight to it
        sent = asyncio.get_running_loop().time()
        await publish(redis, alert(fast))
        [got] = await rx.wait_for("/ok/fast", within=3.0)
        assert got.at - sent < 1.0


async def test_sending_left_by_a_crash_is_resent_with_the_same_id(
    settings, pool, redis, tenant
) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        made = await add_endpoint(run.client, rx.url("/ok/crash"), customer)
        n = alert(customer)
        await publish(redis, n)
        await rx.wait_for("/ok/crash")
        await eventually(lambda: _settled(pool, n.id))
        # as a worker killed between the send and its commit leaves it: sending, leased
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE notification_deliveries SET state = 'sending', attempts = 0,"
                " succeeded_at = NULL, leased_until = now() - interval '1 second'"
                " WHERE notification_id = %s",
                (n.id,),
            )
        got = await rx.wait_for("/ok/crash", 2)
        assert {g.headers["webhook-id"] for g in got} == {n.id}
        for g in got:
            Webhook(made["secret"]).verify(g.body, g.headers)
        assert [r[1] for r in await eventually(lambda: _settled(pool, n.id))] == ["succeeded"]


async def test_rotated_secret_old_and_new_both_verify(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        made = await add_endpoint(run.client, rx.url("/ok/rot"), customer)
        reply = await run.client.post(
            f"/v1/customers/{customer}/webhook-endpoints/{made['id']}/rotate-secret",
            headers=SERVICE,
        )
        assert reply.status_code == 200, reply.text
        rotated = reply.json()
        assert rotated["secret"] != made["secret"] and rotated["previous_secret_until"]
        await publish(redis, alert(customer))
        [got] = await rx.wait_for("/ok/rot")
        assert len(got.headers["webhook-signature"].split(" ")) == 2
        Webhook(made["secret"]).verify(got.body, got.headers)
        Webhook(rotated["secret"]).verify(got.body, got.headers)
        # once the overlap is over only the new secret signs
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE webhook_endpoints SET previous_secret_until = now() WHERE id = %s",
                (made["id"],),
            )
        await publish(redis, alert(customer, usage=900))
        second = (await rx.wait_for("/ok/rot", 2))[1]
        Webhook(rotated["secret"]).verify(second.body, second.headers)
        assert len(second.headers["webhook-signature"].split(" ")) == 1


async def test_resend_and_the_delivery_log(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        await add_endpoint(run.client, rx.url("/ok/log"), customer)
        first, second = alert(customer), alert(customer, usage=900)
        await publish(redis, first)
        await rx.wait_for("/ok/log")
        await publish(redis, second)
        await rx.wait_for("/ok/log", 2)
        await eventually(lambda: _settled(pool, second.id))

        reply = await run.client.post(f"/v1/notifications/{first.id}/resend", headers=SERVICE)
        assert reply.status_code == 202 and reply.json()["deliveries"] == 1
        again = await rx.wait_for("/ok/log", 3)
        assert again[2].headers["webhook-id"] == first.id

        page = await run.client.get(
            f"/v1/customers/{customer}/notifications", params={"limit": 1}, headers=SERVICE
        )
        assert page.status_code == 200, page.text
        [newest] = page.json()["notifications"]
        assert newest["id"] == second.id  # newest first
        assert newest["payload"]["type"] == "alert.triggered"
        rest = await run.client.get(
            f"/v1/customers/{customer}/notifications",
            params={"limit": 1, "cursor": page.json()["next_cursor"]},
            headers=SERVICE,
        )
        [older] = rest.json()["notifications"]
        assert older["id"] == first.id
        await eventually(lambda: _settled(pool, first.id))
        one = await run.client.get(f"/v1/notifications/{first.id}", headers=SERVICE)
        [delivery] = one.json()["deliveries"]
        assert delivery["state"] == "succeeded"
        assert [a["status"] for a in delivery["attempt_log"]] == [200, 200]  # attempts kept
        assert all(a["duration_ms"] >= 0 for a in delivery["attempt_log"])


async def test_test_endpoint_sends_to_that_endpoint_only(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        made = await add_endpoint(run.client, rx.url("/ok/tested"), customer)
        await add_endpoint(run.client, rx.url("/ok/other"), customer)
        reply = await run.client.post(
            f"/v1/customers/{customer}/webhook-endpoints/{made['id']}/test", headers=SERVICE
        )
        assert reply.status_code == 202, reply.text
        [got] = await rx.wait_for("/ok/tested")
        body = Webhook(made["secret"]).verify(got.body, got.headers)
        assert body["type"] == "webhook.test" and body["data"]["endpoint_id"] == made["id"]
        assert got.headers["webhook-id"] == reply.json()["notification_id"]
        await asyncio.sleep(0.3)
        assert rx.at("/ok/other") == []


async def test_deleted_endpoint_gets_nothing_more(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis, send=False) as run:
        made = await add_endpoint(run.client, rx.url("/ok/del"), customer)
        n = alert(customer)
        await publish(redis, n)
        await eventually(lambda: deliveries(pool, n.id))
        reply = await run.client.delete(
            f"/v1/customers/{customer}/webhook-endpoints/{made['id']}", headers=SERVICE
        )
        assert reply.status_code == 204
        [row] = await deliveries(pool, n.id)
        assert row[1] == "failed" and "deleted" in row[4]
        listed = await run.client.get(
            f"/v1/customers/{customer}/webhook-endpoints", headers=SERVICE
        )
        assert listed.json()["endpoints"] == []


async def test_email_to_the_customer_when_a_mailer_is_configured(
    settings, pool, redis, tenant
) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with (
        smtp_inbox() as inbox,
        receiver() as rx,
        running_notifier(settings, pool, redis, mailer=PlainMailer(inbox.port)) as run,
    ):
        made = await add_endpoint(run.client, rx.url("/ok/mail"), customer)
        n = alert(customer)
        await publish(redis, n)
        await rx.wait_for("/ok/mail")
        rows = await eventually(lambda: _settled(pool, n.id))
        assert {(r[0], r[1]) for r in rows} == {(made["id"], "succeeded"), (None, "succeeded")}
        [(to, content)] = inbox.messages
        assert to == [f"{customer}@example.com"] and n.id.encode() in content
        test = await run.client.post(
            f"/v1/customers/{customer}/webhook-endpoints/{made['id']}/test", headers=SERVICE
        )
        await rx.wait_for("/ok/mail", 2)
        assert [r[0] for r in await deliveries(pool, test.json()["notification_id"])] == [
            made["id"]
        ]  # a test webhook is never emailed
        assert len(inbox.messages) == 1


async def test_production_never_calls_an_address_that_turned_internal(
    settings, pool, redis, tenant
) -> None:
    """An endpoint whose host resolves to an internal address by the time of sending
    (DNS re-pointed after it was checked) is not called; the attempt says why."""
    settings = quick(settings, env="production", webhook_retry_schedule=[0])
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        async with pool.connection() as conn:  # as if it had resolved publicly at creation
            await conn.execute(
                "INSERT INTO webhook_endpoints (id, customer_id, url, secret)"
                " VALUES (%s, %s, %s, 'whsec_AAAA')",
                (f"ep_{tenant}", customer, rx.url("/ok/internal").replace("http:", "https:")),
            )
        n = alert(customer)
        await publish(redis, n)
        rows = await eventually(lambda: _settled(pool, n.id))
        assert [r[1] for r in rows] == ["failed"] and "non-public address" in rows[0][4]
        assert rx.at("/ok/internal") == []
        log = await run.client.get(f"/v1/notifications/{n.id}", headers=SERVICE)
        [attempt] = log.json()["deliveries"][0]["attempt_log"]
        assert attempt["status"] is None and attempt["error"].startswith("refused")


async def test_redirects_fail_and_retry_after_is_honoured(settings, pool, redis, tenant) -> None:
    settings = quick(settings, webhook_retry_schedule=[0, 0.1])
    customer = await new_customer(pool, tenant)
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        await add_endpoint(run.client, rx.url("/moved/x"), customer)
        await add_endpoint(run.client, rx.url("/busy/x"), customer)
        n = alert(customer)
        await publish(redis, n)
        busy = await rx.wait_for("/busy/x", 2)
        assert busy[1].at - busy[0].at >= 0.95  # Retry-After: 1 beats the 0.1 s schedule
        moved = await rx.wait_for("/moved/x", 2)
        assert moved[1].at - moved[0].at < 0.9  # a 3xx is a failure, on the schedule
        rows = await eventually(lambda: _settled(pool, n.id))
        assert sorted((r[1], r[3]) for r in rows) == [("failed", 301), ("failed", 429)]


async def test_two_senders_never_send_one_delivery_twice(settings, pool, redis, tenant) -> None:
    settings = quick(settings, notification_poll_seconds=0.05)
    customers = [await new_customer(pool, tenant) for _ in range(5)]
    async with receiver() as rx, running_notifier(settings, pool, redis) as run:
        for customer in customers:
            await add_endpoint(run.client, rx.url(f"/ok/{customer}"), customer)
        other = asyncio.create_task(Sender(pool, policy(settings), asyncio.Event()).run())
        try:
            ids = []
            for usage in range(20):
                for customer in customers:
                    n = alert(customer, usage=usage)
                    ids.append(n.id)
                    await publish(redis, n)
            async with rx.arrived:
                await asyncio.wait_for(rx.arrived.wait_for(lambda: len(rx.requests) >= 100), 20)
            await asyncio.sleep(0.5)
        finally:
            other.cancel()
            await asyncio.gather(other, return_exceptions=True)
        sent = [r.headers["webhook-id"] for r in rx.requests]
        assert sorted(sent) == sorted(ids)  # each exactly once
