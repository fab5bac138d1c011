"""A real HTTP receiver for webhooks, and a running notifier (intake + sender + routes).

The receiver listens on 127.0.0.1 and records every request; what it answers depends
on the path: ``/ok/…`` 200, ``/fail/…`` 500, ``/gone/…`` 410, ``/moved/…`` 301,
``/busy/…`` 429 with ``Retry-After: 1``, ``/hang/…`` never, ``/hold/…`` 200 once the
test sets ``released`` (so it can act while a delivery is in flight).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from aiohttp import web
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.notifications import STREAM, Notification, NotificationType, notification_id
from services.billing.notification.channel import Attempt, Mailer
from services.billing.notification.notifier import Notifier, notifier
from services.common.auth import Authenticator
from services.common.settings import Settings
from services.runtime import Component, http_app
from tests.accounts_support import random_address
from tests.billing_support import subscribe

SERVICE = {"Authorization": "Bearer test-token"}
ADMIN = {"Authorization": "Bearer test-admin-token"}


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    base: str = ""
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, count: int = 1, within: float = 10.0) -> list[Received]:
        async def enough() -> None:
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.at(path)) >= count)

        await asyncio.wait_for(enough(), within)
        return self.at(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with self.arrived:
            self.requests.append(
                Received(request.path, dict(request.headers), body, time.monotonic())
            )
            self.arrived.notify_all()
        kind = request.path.split("/")[1]
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind == "hold":
            await self.released.wait()
        status = {"ok": 200, "hold": 200, "fail": 500, "gone": 410, "moved": 301, "busy": 429}[kind]
        headers = {"Retry-After": "1"} if kind == "busy" else {}
        return web.Response(status=status, text=f"{kind} says {status}", headers=headers)


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", found._handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.base = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()


def quick(settings: Settings, **overrides: Any) -> Settings:
    """Delivery settings a test can wait out: retries within a second."""
    return settings.model_copy(
        update={
            "admin_token": "test-admin-token",
            "webhook_retry_schedule": [0, 0.2, 0.2],
            "webhook_timeout_seconds": 2.0,
            "notification_poll_seconds": 0.1,
            "notification_consumer": f"test-{uuid.uuid4().hex[:6]}",
            **overrides,
        }
    )


@dataclass
class Running:
    notifier: Notifier
    client: httpx.AsyncClient
    pool: AsyncConnectionPool
    redis: Redis


@asynccontextmanager
async def running_notifier(
    settings: Settings,
    pool: AsyncConnectionPool,
    redis: Redis,
    send: bool = True,
    mailer: Mailer | None = None,
) -> AsyncIterator[Running]:
    """Intake and (unless ``send`` is False) the sender running, routes as a client."""
    await redis.delete(STREAM)  # this test's stream and group, nothing older
    auth = Authenticator(settings, redis, pool)
    made = notifier(settings, pool, redis, auth, mailer)
    tasks = [asyncio.create_task(made.intake.run())]
    if send:
        tasks.append(asyncio.create_task(made.sender.run()))
    app = http_app([Component("billing", routers=made.routers)])
    transport = httpx.ASGITransport(app, client=(random_address(), 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield Running(made, client, pool, redis)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with pool.connection() as conn:  # seller endpoints get everyone's: not later tests'
            await conn.execute(
                "UPDATE webhook_endpoints SET deleted_at = now() WHERE customer_id IS NULL"
            )


async def new_customer(pool: AsyncConnectionPool, tenant: str) -> str:
    customer = f"{tenant}-{uuid.uuid4().hex[:6]}"
    await subscribe(pool, customer, "free", datetime.now(UTC))
    return customer


def alert(customer: str, usage: int = 800, meter: str = "api_calls") -> Notification:
    occurred = datetime.now(UTC)
    period = {"start": f"{occurred:%Y-%m}-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
    return Notification(
        id=notification_id(
            NotificationType.ALERT_TRIGGERED,
            customer,
            meter,
            period["start"],
            "plan",
            "percent",
            usage,
        ),
        type=NotificationType.ALERT_TRIGGERED,
        customer=customer,
        occurred_at=occurred,
        data={
            "customer": customer,
            "meter": meter,
            "period": period,
            "threshold": {"kind": "percent", "value": "80", "quantity": str(usage)},
            "usage": str(usage),
            "limit": "1000",
            "rule": "plan",
        },
    )


def invoice(customer: str) -> Notification:
    invoice_id = f"in_{uuid.uuid4().hex[:8]}"
    return Notification(
        id=notification_id(NotificationType.INVOICE_FINALIZED, customer, invoice_id),
        type=NotificationType.INVOICE_FINALIZED,
        customer=customer,
        occurred_at=datetime.now(UTC),
        data={
            "customer": customer,
            "invoice_id": invoice_id,
            "total": "12.50",
            "currency": "usd",
            "period": {},
        },
    )


async def add_endpoint(
    client: httpx.AsyncClient,
    url: str,
    customer: str | None = None,
    events: list[str] | None = None,
    headers: dict[str, str] = SERVICE,
) -> dict[str, Any]:
    path = f"/v1/customers/{customer}/webhook-endpoints" if customer else "/v1/webhook-endpoints"
    body: dict[str, Any] = {"url": url}
    if events is not None:
        body["events"] = events
    reply = await client.post(path, json=body, headers=headers)
    assert reply.status_code == 201, reply.text
    found: dict[str, Any] = reply.json()
    return found


async def eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


@dataclass
class Inbox:
    """A real SMTP server in-process (aiosmtpd), keeping what it was sent."""

    port: int = 0
    messages: list[tuple[list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 OK"


@asynccontextmanager
async def smtp_inbox() -> AsyncIterator[Inbox]:
    from aiosmtpd.controller import Controller

    with socket.socket() as probe:  # the controller checks its port, so not 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inbox = Inbox(port)
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield inbox
    finally:
        await asyncio.to_thread(controller.stop)


class PlainMailer:
    """The simplest ``Mailer`` (the email channel's own lives in ``notification.email``):
    one plain-text message over SMTP, to exercise the sender's email path."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def send(
        self, notification: Notification, to: str, *, company: str | None = None
    ) -> Attempt:
        import aiosmtplib

        started = time.monotonic()
        message = f"Subject: {notification.type}\r\n\r\n{notification.id}\r\n"
        errors, reply = await aiosmtplib.send(
            message,
            sender="tally@example.com",
            recipients=[to],
            hostname="127.0.0.1",
            port=self.port,
        )
        return Attempt(
            ok=not errors,
            status=250,
            response=reply,
            error=None,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
