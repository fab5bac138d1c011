"""The accounts store: customers, API keys and the audit log in PostgreSQL, the truth.

Only the accounts service (``service``) and its routes call these; other services reach
accounts through the service.

The enforcement hot path never reads these tables: ``projection`` copies what it needs
into Redis after each change.  Functions here take a connection so that a caller can
group them in one transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from schemas import api_keys
from schemas.api_keys import Environment, Scope
from schemas.events import utcnow
from schemas.plans import Plan


class Status(StrEnum):
    TRIAL = "trial"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    SUSPENDED = "suspended"
    CANCELLED = "cancelled"


class Customer(BaseModel):
    id: str
    email: str
    company: str
    plan: str
    status: Status
    trial_ends_at: datetime | None
    created_at: datetime
    status_since: datetime
    timezone: str = Field("UTC", description="Billing time zone: where periods start (IANA)")


class ApiKey(BaseModel):
    """A key as it may be shown after creation: never the secret, only its last 4."""

    id: str
    customer: str
    prefix: str
    last4: str
    name: str
    scopes: list[Scope]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    replaced_by: str | None

    def holder(self) -> api_keys.Holder:
        scopes = tuple(s.value for s in self.scopes)
        return api_keys.Holder(self.customer, self.id, scopes, self.expires_at, self.revoked_at)


class EmailTaken(Exception):
    pass


class UnknownPlan(LookupError):
    """A plan id the catalog does not have."""


class KeyRevoked(Exception):
    """A revoked key cannot be rotated: its replacement would bring it back to life."""


_CUSTOMER = (
    "SELECT id, email, company, plan_id AS plan, status, trial_ends_at, created_at,"
    " status_since, timezone FROM customers"
)
_KEY = (
    "SELECT id, customer_id AS customer, prefix, last4, name, scopes, created_at,"
    " expires_at, revoked_at, replaced_by FROM api_keys"
)


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(8)}"


async def audit(
    conn: AsyncConnection, actor: str, action: str, subject: str, **detail: Any
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES (%s, %s, %s, %s)",
        (actor, action, subject, Jsonb(detail)),
    )


async def create_customer(
    conn: AsyncConnection,
    *,
    email: str,
    company: str,
    plan: Plan,
    actor: str,
    customer_id: str | None = None,
    timezone: str = "UTC",
) -> Customer:
    """A new customer on ``plan``, in trial when the plan offers one."""
    now = utcnow()
    trial_ends = now + timedelta(days=plan.trial_days) if plan.trial_days else None
    status = Status.TRIAL if trial_ends else Status.ACTIVE
    cid = customer_id or new_id("cus")
    taken = await conn.execute("SELECT 1 FROM customers WHERE lower(email) = lower(%s)", (email,))
    if await taken.fetchone():
        raise EmailTaken(email)
    try:
        await conn.execute(
            "INSERT INTO customers (id, email, company, plan_id, status, trial_ends_at,"
            " timezone) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (cid, email, company, plan.id, status.value, trial_ends, timezone),
        )
    except UniqueViolation as exc:  # a concurrent sign-up with the same email or id
        raise EmailTaken(email) from exc
    await audit(
        conn, actor, "customer.created", cid, plan=plan.id, status=status.value, timezone=timezone
    )
    found = await get_customer(conn, cid)
    assert found is not None
    return found


async def get_customer(conn: AsyncConnection, customer_id: str) -> Customer | None:
    async with conn.cursor(row_factory=class_row(Customer)) as cur:
        await cur.execute(f"{_CUSTOMER} WHERE id = %s", (customer_id,))
        return await cur.fetchone()


async def list_customers(
    conn: AsyncConnection, *, plan: str | None = None, limit: int = 100, after: str = ""
) -> list[Customer]:
    async with conn.cursor(row_factory=class_row(Customer)) as cur:
        await cur.execute(
            f"{_CUSTOMER} WHERE id > %s AND (%s::text IS NULL OR plan_id = %s)"
            " ORDER BY id LIMIT %s",
            (after, plan, plan, limit),
        )
        return await cur.fetchall()


async def customers_on(conn: AsyncConnection, plan_id: str) -> list[str]:
    cur = await conn.execute("SELECT id FROM customers WHERE plan_id = %s", (plan_id,))
    return [row[0] for row in await cur.fetchall()]


async def zones(conn: AsyncConnection) -> list[tuple[str, str]]:
    """Each customer billed in a zone other than UTC, with its zone."""
    cur = await conn.execute("SELECT id, timezone FROM customers WHERE timezone <> 'UTC'")
    return [(row[0], row[1]) for row in await cur.fetchall()]


class Invoiced(Exception):
    """The customer has invoices: its billing time zone may no longer move its periods."""


async def set_timezone(conn: AsyncConnection, customer_id: str, timezone: str, actor: str) -> None:
    """Move the customer's periods to ``timezone``, before its first invoice only."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT timezone, EXISTS (SELECT 1 FROM invoices WHERE customer_id = c.id)"
            " FROM customers c WHERE id = %s FOR UPDATE",
            (customer_id,),
        )
        row = await cur.fetchone()
        if row is None or row[0] == timezone:
            return
        if row[1]:
            raise Invoiced(customer_id)
        await conn.execute(
            "UPDATE customers SET timezone = %s, updated_at = now() WHERE id = %s",
            (timezone, customer_id),
        )
        await audit(conn, actor, "customer.timezone", customer_id, before=row[0], after=timezone)


TRIAL_END = "trial_end"
"""The source of a plan change an ended trial makes, and the change's id (a trial ends
once)."""


async def record_change(conn: AsyncConnection, source: str, change: str | None = None) -> None:
    """Name who makes the plan change about to be written in this transaction, for the
    ``subscription_history`` trigger to record beside it (billing re-tells a change whose
    ``plan.changed`` a crash lost, under the id the immediate publish used: ``change``,
    else the change's time)."""
    await conn.execute(
        "SELECT set_config('tally.change_source', %s, true),"
        " set_config('tally.change_ref', %s, true)",
        (source, change or ""),
    )


async def change_plan(
    conn: AsyncConnection, customer_id: str, plan: Plan, actor: str
) -> tuple[str, datetime] | None:
    """Move a customer to ``plan``; an expired or absent trial does not restart.  The
    plan it was on and when it changed; None for an unknown customer."""
    await record_change(conn, actor)
    cur = await conn.execute(
        "UPDATE customers c SET plan_id = %s, updated_at = now()"
        " FROM (SELECT id, plan_id FROM customers WHERE id = %s FOR UPDATE) old"
        " WHERE c.id = old.id RETURNING old.plan_id, c.updated_at",
        (plan.id, customer_id),
    )
    row = await cur.fetchone()
    await audit(conn, actor, "customer.plan_changed", customer_id, plan=plan.id)
    return (str(row[0]), row[1]) if row else None


async def set_status(
    conn: AsyncConnection, customer_id: str, status: Status, actor: str, **detail: Any
) -> None:
    await conn.execute(
        "UPDATE customers SET status = %s, updated_at = now() WHERE id = %s",
        (status.value, customer_id),
    )
    await audit(conn, actor, "customer.status_changed", customer_id, status=status, **detail)


async def exists(conn: AsyncConnection, customer_id: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM customers WHERE id = %s", (customer_id,))
    return await cur.fetchone() is not None


async def status_of(conn: AsyncConnection, customer_id: str) -> Status | None:
    cur = await conn.execute("SELECT status FROM customers WHERE id = %s", (customer_id,))
    row = await cur.fetchone()
    return Status(row[0]) if row else None


async def sync_plan_and_status(
    conn: AsyncConnection,
    customer_id: str,
    plan_id: str | None,
    status: Status | None,
    actor: str,
    change: str | None = None,
) -> tuple[str, Status, str] | None:
    """Set a plan and/or a status (``None`` keeps the current one) in one statement,
    audited as ``customer.sync``: the plan and status now and the plan before.  ``None``
    when the customer does not exist; ``UnknownPlan`` when the plan is not in the
    catalog.  ``change`` (the provider's event id) is recorded with the history row."""
    if plan_id is not None:
        cur = await conn.execute("SELECT 1 FROM plans WHERE id = %s", (plan_id,))
        if await cur.fetchone() is None:
            raise UnknownPlan(plan_id)
    await record_change(conn, actor, change)
    cur = await conn.execute(
        "UPDATE customers c SET plan_id = coalesce(%s, c.plan_id),"
        " status = coalesce(%s, c.status), updated_at = now()"
        " FROM (SELECT id, plan_id FROM customers WHERE id = %s FOR UPDATE) old"
        " WHERE c.id = old.id RETURNING c.plan_id, c.status, old.plan_id",
        (plan_id, status.value if status else None, customer_id),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    await audit(conn, actor, "customer.sync", customer_id, plan=row[0], status=row[1])
    return str(row[0]), Status(row[1]), str(row[2])


async def end_trial(
    conn: AsyncConnection, customer_id: str, downgrade_to: Plan | None, actor: str
) -> str | None:
    """An unpaid trial that has run out: onto ``downgrade_to`` (active), or suspended.
    The plan the trial was on when this call made the change, else None (concurrent
    callers race harmlessly)."""
    await record_change(conn, TRIAL_END, TRIAL_END)
    cur = await conn.execute(
        "UPDATE customers c SET plan_id = coalesce(%s, c.plan_id), status = %s,"
        " updated_at = now()"
        " FROM (SELECT id, plan_id FROM customers WHERE id = %s FOR UPDATE) old"
        " WHERE c.id = old.id AND c.status = 'trial' AND c.trial_ends_at <= now()"
        " RETURNING old.plan_id",
        (
            downgrade_to.id if downgrade_to else None,
            (Status.ACTIVE if downgrade_to else Status.SUSPENDED).value,
            customer_id,
        ),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    plan = downgrade_to.id if downgrade_to else None
    await audit(conn, actor, "customer.trial_ended", customer_id, downgraded_to=plan)
    return str(row[0])


async def issue_key(
    conn: AsyncConnection,
    customer_id: str,
    pepper: bytes,
    actor: str,
    *,
    scopes: Sequence[Scope] = api_keys.ALL_SCOPES,
    name: str = "",
    expires_at: datetime | None = None,
    environment: Environment = Environment.LIVE,
) -> tuple[ApiKey, str]:
    """A new key; the secret is returned here and never again."""
    new = api_keys.generate(environment)
    kid = new_id("key")
    await conn.execute(
        "INSERT INTO api_keys (id, customer_id, hash, prefix, last4, name, scopes, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            kid,
            customer_id,
            api_keys.digest(pepper, new.secret),
            new.prefix,
            new.last4,
            name,
            [s.value for s in scopes],
            expires_at,
        ),
    )
    await audit(conn, actor, "key.issued", customer_id, key=kid, scopes=list(scopes))
    key = await get_key(conn, kid)
    assert key is not None
    return key, new.secret


async def get_key(conn: AsyncConnection, key_id: str) -> ApiKey | None:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(f"{_KEY} WHERE id = %s", (key_id,))
        return await cur.fetchone()


async def list_keys(conn: AsyncConnection, customer_id: str) -> list[ApiKey]:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(f"{_KEY} WHERE customer_id = %s ORDER BY created_at", (customer_id,))
        return await cur.fetchall()


async def revoke_key(conn: AsyncConnection, key: ApiKey, actor: str) -> None:
    await conn.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s", (key.id,)
    )
    await audit(conn, actor, "key.revoked", key.customer, key=key.id)


async def rotate_key(
    conn: AsyncConnection, key: ApiKey, pepper: bytes, grace: timedelta, actor: str
) -> tuple[ApiKey, str]:
    """A replacement with the same scopes; the old key keeps working for ``grace``, so
    deployments can switch over without a failed request.

    The key's row stays locked until the caller commits, and its revocation is read
    under that lock: a revocation that commits first is seen here (``KeyRevoked``), and
    one that comes later waits, then revokes the old key only.
    """
    cur = await conn.execute("SELECT revoked_at FROM api_keys WHERE id = %s FOR UPDATE", (key.id,))
    row = await cur.fetchone()
    if row is None or row[0] is not None:
        raise KeyRevoked(key.id)
    new, secret = await issue_key(
        conn,
        key.customer,
        pepper,
        actor,
        scopes=key.scopes,
        name=key.name,
        expires_at=key.expires_at,
        environment=Environment(key.prefix.removeprefix("tally_").rstrip("_")),
    )
    ends = utcnow() + grace
    await conn.execute(
        "UPDATE api_keys SET replaced_by = %s,"
        " expires_at = least(coalesce(expires_at, %s), %s) WHERE id = %s",
        (new.id, ends, ends, key.id),
    )
    await audit(conn, actor, "key.rotated", key.customer, key=key.id, replaced_by=new.id)
    return new, secret
