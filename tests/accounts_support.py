"""A running API (usage, enforcement, accounts, admin) over the real stores, in-process."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from services.api import service as api_service
from services.common.settings import Settings
from services.runtime import Runtime, http_app

ADMIN = {"Authorization": "Bearer test-admin-token"}


def random_address() -> str:
    """A client address of its own per test: per-address limits never leak across tests."""
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


@asynccontextmanager
async def running_api(settings: Settings, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings.model_copy(update={"admin_token": "test-admin-token", **overrides})
    async with Runtime(settings) as runtime:
        app = http_app([await api_service.start(runtime)])
        transport = httpx.ASGITransport(app, client=(random_address(), 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


@dataclass
class Account:
    customer: str
    key: str
    key_id: str
    email: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def sign_up(client: httpx.AsyncClient, plan: str = "free") -> Account:
    reply = await client.post(
        "/v1/signup",
        json={"email": f"{uuid.uuid4().hex[:10]}@example.com", "company": "Acme", "plan": plan},
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    customer, key = body["customer"], body["api_key"]
    return Account(customer["id"], key["key"], key["id"], customer["email"])


async def put_plan(client: httpx.AsyncClient, plan: dict[str, Any]) -> None:
    reply = await client.put(f"/v1/admin/plans/{plan['id']}", json=plan, headers=ADMIN)
    assert reply.status_code == 200, reply.text


def plan_with(
    quota: int | None = None, per_minute: int = 100_000, hard: bool = True, **extra: Any
) -> dict[str, Any]:
    """A plan of its own for one test (plans are shared by the whole session)."""
    plan: dict[str, Any] = {
        "id": f"p-{uuid.uuid4().hex[:8]}",
        "name": "Test plan",
        "rate_limits": [{"name": "per-minute", "limit": per_minute, "per": "minute"}],
        "upgrade_to": "pro",
    }
    if quota is not None:
        plan["quotas"] = {"api_calls": {"limit": quota, "enforcement": "hard" if hard else "soft"}}
    return plan | extra


async def customer_on(
    client: httpx.AsyncClient, plan: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """Save ``plan`` and create a customer on it: its id and its key's auth header."""
    await put_plan(client, plan)
    reply = await client.post(
        "/v1/admin/customers",
        json={"email": f"{uuid.uuid4().hex[:10]}@example.com", "plan": plan["id"]},
        headers=ADMIN,
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    return body["customer"]["id"], {"Authorization": f"Bearer {body['api_key']['key']}"}


async def enforce(client: httpx.AsyncClient, account: Account, **body: Any) -> httpx.Response:
    return await client.post("/v1/enforce", json=body, headers=account.auth)
