"""Webhook endpoints refuse what they cannot safely call, each with its own problem type
naming the field; who may manage which endpoints."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from services.common.notify import publish
from tests.accounts_support import running_api, sign_up
from tests.webhook_support import (
    ADMIN,
    SERVICE,
    Running,
    add_endpoint,
    alert,
    eventually,
    new_customer,
    quick,
    running_notifier,
)

PROBLEMS = "https://tally.dev/problems/"


def problem(
    reply: httpx.Response, status: int, slug: str, field: str | None = None
) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = reply.json()
    assert body["type"] == PROBLEMS + slug, body
    if field is not None:
        assert [e["field"] for e in body["errors"]] == [field], body
    return body


@pytest.mark.parametrize(
    ("url", "slug"),
    [
        ("http://example.com/hook", "insecure-url"),
        ("https://127.0.0.1/hook", "private-address"),
        ("https://localhost:8443/hook", "private-address"),
        ("https://10.1.2.3/hook", "private-address"),
        ("https://169.254.169.254/latest/meta-data", "private-address"),
        ("https://[::1]/hook", "private-address"),
        ("https://no-such-host.invalid/hook", "unresolvable-host"),
        ("not a url", "invalid-url"),
        ("ftp://example.com/hook", "invalid-url"),
        ("https://user:pw@example.com/hook", "invalid-url"),
        ("https://example.com:99999/hook", "invalid-url"),
    ],
)
async def test_unsafe_urls_refused_outside_development(
    settings, pool, redis, tenant, url, slug
) -> None:
    settings = quick(settings, env="production")
    customer = await new_customer(pool, tenant)
    async with running_notifier(settings, pool, redis, send=False) as run:
        reply = await run.client.post(
            f"/v1/customers/{customer}/webhook-endpoints", json={"url": url}, headers=SERVICE
        )
        problem(reply, 422, slug, "body.url")
        seller = await run.client.post("/v1/webhook-endpoints", json={"url": url}, headers=ADMIN)
        problem(seller, 422, slug, "body.url")


async def test_development_allows_local_http(settings, pool, redis, tenant) -> None:
    settings = quick(settings, env="development")
    customer = await new_customer(pool, tenant)
    async with running_notifier(settings, pool, redis, send=False) as run:
        await add_endpoint(run.client, "http://127.0.0.1:9/hook", customer)
        reply = await run.client.post(
            f"/v1/customers/{customer}/webhook-endpoints",
            json={"url": "http://no-such-host.invalid/"},
            headers=SERVICE,
        )
        problem(reply, 422, "unresolvable-host", "body.url")  # even in development


async def test_unknown_event_type_and_bad_bodies(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    path = f"/v1/customers/{customer}/webhook-endpoints"
    async with running_notifier(settings, pool, redis, send=False) as run:
        reply = await run.client.post(
            path,
            json={"url": "http://127.0.0.1:9/", "events": ["alert.triggered", "alert.typo"]},
            headers=SERVICE,
        )
        body = problem(reply, 422, "unknown-event-type", "body.events[1]")
        assert "alert.typo" in body["detail"]
        missing = await run.client.post(path, json={"events": []}, headers=SERVICE)
        problem(missing, 422, "invalid-request", "body.url")
        extra = await run.client.post(
            path, json={"url": "http://127.0.0.1:9/", "secret": "mine"}, headers=SERVICE
        )
        problem(extra, 422, "invalid-request", "body.secret")


async def test_at_most_ten_endpoints(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer = await new_customer(pool, tenant)
    async with running_notifier(settings, pool, redis, send=False) as run:
        made = [
            await add_endpoint(run.client, f"http://127.0.0.1:9/{i}", customer) for i in range(10)
        ]
        reply = await run.client.post(
            f"/v1/customers/{customer}/webhook-endpoints",
            json={"url": "http://127.0.0.1:9/11"},
            headers=SERVICE,
        )
        body = problem(reply, 409, "too-many-endpoints", "body.url")
        assert body["limit"] == 10
        deleted = await run.client.delete(
            f"/v1/customers/{customer}/webhook-endpoints/{made[0]['id']}", headers=SERVICE
        )
        assert deleted.status_code == 204
        await add_endpoint(run.client, "http://127.0.0.1:9/11", customer)  # room again


async def test_unknown_endpoint_customer_and_notification(settings, pool, redis, tenant) -> None:
    settings = quick(settings)
    customer, other = await new_customer(pool, tenant), await new_customer(pool, tenant)
    base = f"/v1/customers/{customer}/webhook-endpoints"
    async with running_notifier(settings, pool, redis, send=False) as run:
        theirs = await add_endpoint(run.client, "http://127.0.0.1:9/", other)
        for method, path in [
            ("DELETE", f"{base}/ep_nope"),
            ("POST", f"{base}/ep_nope/rotate-secret"),
            ("POST", f"{base}/ep_nope/test"),
            ("POST", f"{base}/ep_nope/disable"),
            ("POST", f"{base}/{theirs['id']}/rotate-secret"),  # another customer's
            ("DELETE", f"/v1/webhook-endpoints/{theirs['id']}"),  # not a seller endpoint
        ]:
            reply = await run.client.request(method, path, headers=SERVICE)
            problem(reply, 404, "unknown-endpoint")
        nobody = await run.client.post(
            f"/v1/customers/{tenant}-nobody/webhook-endpoints",
            json={"url": "http://127.0.0.1:9/"},
            headers=SERVICE,
        )
        problem(nobody, 404, "unknown-customer")
        for method, path in [
            ("GET", "/v1/notifications/msg_nope"),
            ("POST", "/v1/notifications/msg_nope/resend"),
        ]:
            reply = await run.client.request(method, path, headers=SERVICE)
            problem(reply, 404, "unknown-notification")
        bad_cursor = await run.client.get(
            f"/v1/customers/{customer}/notifications", params={"cursor": "x"}, headers=SERVICE
        )
        problem(bad_cursor, 422, "invalid-parameter", "query.cursor")


async def test_a_customer_key_manages_its_own_endpoints_only(settings, pool, redis) -> None:
    settings = quick(settings)
    async with running_api(settings) as api:
        mine, theirs = await sign_up(api), await sign_up(api)
    async with running_notifier(settings, pool, redis, send=False) as run:
        made = await add_endpoint(
            run.client, "http://127.0.0.1:9/", mine.customer, headers=mine.auth
        )
        listed = await run.client.get(
            f"/v1/customers/{mine.customer}/webhook-endpoints", headers=mine.auth
        )
        assert [e["id"] for e in listed.json()["endpoints"]] == [made["id"]]
        other = await run.client.get(
            f"/v1/customers/{theirs.customer}/webhook-endpoints", headers=mine.auth
        )
        problem(other, 403, "forbidden")
        seller = await run.client.post(
            "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/"}, headers=mine.auth
        )
        problem(seller, 403, "forbidden")
        nobody = await run.client.get("/v1/webhook-endpoints")
        problem(nobody, 401, "unauthorized")
        admin = await run.client.get(
            f"/v1/customers/{theirs.customer}/webhook-endpoints", headers=ADMIN
        )
        assert admin.status_code == 200

        # the delivery log: a key sees its own channels, not the seller's endpoints
        seller_endpoint = await add_endpoint(run.client, "http://127.0.0.1:9/seller")
        n = alert(mine.customer)
        await publish(redis, n)
        await eventually(lambda: _logged(run, n.id))
        own = await run.client.get(f"/v1/notifications/{n.id}", headers=mine.auth)
        assert [d["endpoint_id"] for d in own.json()["deliveries"]] == [made["id"]]
        everything = await run.client.get(f"/v1/notifications/{n.id}", headers=SERVICE)
        assert {d["endpoint_id"] for d in everything.json()["deliveries"]} == {
            made["id"],
            seller_endpoint["id"],
        }
        page = await run.client.get(
            f"/v1/customers/{mine.customer}/notifications", headers=mine.auth
        )
        assert [x["id"] for x in page.json()["notifications"]] == [n.id]
        problem(
            await run.client.get(f"/v1/notifications/{n.id}", headers=theirs.auth), 403, "forbidden"
        )
        problem(
            await run.client.post(f"/v1/notifications/{n.id}/resend", headers=theirs.auth),
            403,
            "forbidden",
        )
        resent = await run.client.post(f"/v1/notifications/{n.id}/resend", headers=mine.auth)
        assert resent.status_code == 202 and resent.json()["deliveries"] == 1  # its own only
        problem(
            await run.client.get(
                f"/v1/customers/{theirs.customer}/notifications", headers=mine.auth
            ),
            403,
            "forbidden",
        )


async def _logged(run: Running, notification_id: str) -> bool:
    reply = await run.client.get(f"/v1/notifications/{notification_id}", headers=SERVICE)
    return reply.status_code == 200


async def test_routes_are_documented(settings, pool, redis) -> None:
    async with running_notifier(quick(settings), pool, redis, send=False) as run:
        spec = (await run.client.get("/openapi.json")).json()
    assert {
        "/v1/customers/{customer}/webhook-endpoints",
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}",
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}/rotate-secret",
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}/test",
        "/v1/webhook-endpoints",
        "/v1/customers/{customer}/notifications",
        "/v1/notifications/{notification}",
        "/v1/notifications/{notification}/resend",
    } <= set(spec["paths"])
    referenced = set(re.findall(r"#/components/schemas/([\w-]+)", str(spec)))
    assert referenced <= set(spec["components"]["schemas"])
    created = spec["paths"]["/v1/customers/{customer}/webhook-endpoints"]["post"]
    schema = created["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    assert "secret" in spec["components"]["schemas"][schema.rsplit("/", 1)[1]]["properties"]
