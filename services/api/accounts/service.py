"""The accounts service: the one way customers, API keys and the audit log change.

Sign-up, self-service and the admin API (its routes), and Stripe's webhook (a plan or
status the payment provider decided) all go through here: the store (``store``) writes
PostgreSQL, then the projection (``projection``) copies the account into Redis for
enforcement.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from redis.asyncio import Redis

from schemas import notifications
from schemas.api_keys import ALL_SCOPES, Environment, Holder, Scope
from schemas.date_times import RFC3339
from schemas.events import utcnow
from schemas.notifications import Notification
from schemas.plans import Plan
from schemas.problem_types import EMAIL_TAKEN, KEY_REVOKED, UNKNOWN_KEY
from services.api.accounts import projection, store
from services.api.accounts.grants import check_grant
from services.api.accounts.projection_lock import lock_projection
from services.api.accounts.store import ApiKey, Customer, EmailTaken, KeyRevoked
from services.api.accounts.store import Status as Status
from services.common import catalog
from services.common.auth import Authenticator
from services.common.logging import get_logger
from services.common.notify import publish_once
from services.common.problems import Problem, invalid_field, unknown_customer
from services.common.redis import UNREACHABLE
from services.common.settings import Settings
from services.common.zone_book import ZoneBook

log = get_logger("tally.accounts")


class NewKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(max_length=100)] = ""
    scopes: Annotated[list[Scope], Field(min_length=1)] = list(ALL_SCOPES)
    expires_at: Annotated[AwareDatetime | None, RFC3339] = None
    environment: Environment = Environment.LIVE

    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= utcnow():
            raise ValueError("must lie in the future")
        return value


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_seconds: Annotated[int | None, Field(ge=0, le=30 * 86400)] = None


class IssuedKey(ApiKey):
    """A key as issued: the only response that ever carries a key's secret."""

    key: str = Field(description="The secret: shown this once, never again.")


class RotatedKey(IssuedKey):
    """The replacement key; the old one keeps working for ``old_key_valid_for_seconds``."""

    old_key_valid_for_seconds: int


class OpenedAccount(BaseModel):
    customer: Customer
    api_key: IssuedKey | None = Field(description="Its first key; null when opened without one.")


def issued(key: ApiKey, secret: str) -> IssuedKey:
    """The only response that ever carries a key's secret."""
    return IssuedKey.model_validate(key.model_dump() | {"key": secret})


class Accounts:
    """What sign-up and key management share with the admin routes."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: AsyncConnectionPool,
        auth: Authenticator,
        admit_address: Callable[[str], None],
        zones: ZoneBook | None = None,
    ) -> None:
        """``admit_address`` raises 429 for a client address that sends too much (the
        layer before authentication, which sign-up shares with enforcement); ``zones``,
        this process's billing zones, is refreshed after each change so that its own
        next decision counts a zone just set (other processes: within a second)."""
        self.zones = zones
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self.auth = auth
        self.admit_address = admit_address

    async def plan(self, plan_id: str) -> Plan:
        """The plan a request body names (``body.plan``); 422 listing those there are."""
        async with self.pool.connection() as conn:
            found = await catalog.read_plan(conn, plan_id)
            if found is not None:
                return found
            known = [p.id for p in await catalog.read_plans(conn)]
        raise invalid_field("body.plan", f"unknown plan {plan_id!r}; plans: {', '.join(known)}")

    async def customer(self, customer_id: str) -> Customer:
        async with self.pool.connection() as conn:
            found = await store.get_customer(conn, customer_id)
        if found is None:
            raise unknown_customer(customer_id)
        return found

    async def key(self, customer_id: str, key_id: str) -> ApiKey:
        async with self.pool.connection() as conn:
            found = await store.get_key(conn, key_id)
        if found is None or found.customer != customer_id:
            raise Problem(UNKNOWN_KEY, f"no key {key_id!r} for this customer")
        return found

    async def reproject(self, customer_id: str) -> None:
        """After a committed change.  If Redis fails here the change still stands (and a
        new secret is still returned): enforcement re-projects an account or key it
        lacks, and the next change re-projects the rest."""
        try:
            await projection.project_customer(self.redis, self.pool, customer_id)
            if self.zones is not None:
                await self.zones.refresh()
        except UNREACHABLE as exc:
            log.warning("projection into Redis failed", customer=customer_id, error=repr(exc))

    async def open_account(
        self,
        email: str,
        company: str,
        plan: Plan,
        actor: str,
        *,
        customer_id: str | None = None,
        with_key: bool = True,
        timezone: str = "UTC",
    ) -> OpenedAccount:
        """A new customer and, unless told otherwise, its first key: sign-up and the
        admin API alike."""
        try:
            async with self.pool.connection() as conn:
                customer = await store.create_customer(
                    conn,
                    email=email,
                    company=company,
                    plan=plan,
                    actor=actor,
                    customer_id=customer_id,
                    timezone=timezone,
                )
                key = None
                if with_key:
                    new, secret = await store.issue_key(
                        conn, customer.id, self.settings.pepper, actor
                    )
                    key = issued(new, secret)
        except EmailTaken:
            raise Problem(EMAIL_TAKEN, "an account with this email exists") from None
        await self.reproject(customer.id)
        return OpenedAccount(customer=customer, api_key=key)

    async def new_key(
        self, customer_id: str, body: NewKeyRequest, actor: str, *, grantor: Holder | None
    ) -> IssuedKey:
        """``grantor``: the customer's key asking (``None``: the seller, who may ask
        anything); it cannot issue more than it holds (``check_grant``)."""
        if grantor is not None:
            check_grant(grantor, body.scopes, body.expires_at)
        async with self.pool.connection() as conn:
            key, secret = await store.issue_key(
                conn,
                customer_id,
                self.settings.pepper,
                actor,
                scopes=body.scopes,
                name=body.name,
                expires_at=body.expires_at,
                environment=body.environment,
            )
        await self.reproject(customer_id)
        return issued(key, secret)

    async def rotate(
        self, key: ApiKey, body: Rotation, actor: str, *, grantor: Holder | None
    ) -> RotatedKey:
        """The replacement has ``key``'s scopes and expiry, so ``grantor`` (as in
        ``new_key``) must be able to issue those; if not, nothing changes."""
        if grantor is not None:
            check_grant(grantor, key.scopes, key.expires_at)
        grace = body.grace_seconds
        if grace is None:
            grace = self.settings.key_rotation_grace_seconds
        try:
            async with self.pool.connection() as conn:
                new, secret = await store.rotate_key(
                    conn, key, self.settings.pepper, timedelta(seconds=grace), actor
                )
        except KeyRevoked:
            raise Problem(KEY_REVOKED, "a revoked key cannot be rotated") from None
        await self.reproject(key.customer)
        return RotatedKey.model_validate(
            issued(new, secret).model_dump() | {"old_key_valid_for_seconds": grace}
        )

    async def revoke(self, key: ApiKey, actor: str) -> None:
        async with self.pool.connection() as conn:
            await store.revoke_key(conn, key, actor)
        await self.reproject(key.customer)


async def follow_billing(
    conn: AsyncConnection,
    customer_id: str,
    plan_id: str | None,
    status: Status | None,
    change: str | None = None,
) -> tuple[str, Status, str] | None:
    """Apply the payment provider's word in the caller's transaction (see
    ``store.sync_plan_and_status``), audited as done by ``stripe``: the plan and status
    now and the plan before (``plan_changed`` tells a change once committed; ``change``,
    the Stripe event's id, is recorded with it for billing to re-tell a lost one).

    The caller drops the customer's Redis projection once the transaction commits: the
    projection lock taken here keeps a projection already in flight from landing after."""
    changed = await store.sync_plan_and_status(
        conn, customer_id, plan_id, status, "stripe", change=change
    )
    if changed is not None:
        await lock_projection(conn, customer_id)
    return changed


PLAN_CHANGE_REMEMBERED = timedelta(days=7)


plan_changed = notifications.plan_changed
"""``plan.changed`` of a committed change (``schemas.notifications.plan_changed``)."""


async def tell(
    redis: Redis, note: Notification | None, remember: timedelta = PLAN_CHANGE_REMEMBERED
) -> None:
    """Publish a decision already committed.  Telling never undoes or fails the
    decision: if Redis cannot take it, it is logged and lost (a crash between the commit
    and this call loses it too; the audit log still records the change)."""
    if note is None:
        return
    try:
        await publish_once(redis, note, remember)
    except UNREACHABLE as exc:
        log.warning("notification not published", id=note.id, type=note.type, error=repr(exc))


exists = store.exists
status_of = store.status_of
UnknownPlan = store.UnknownPlan
