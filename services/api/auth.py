"""Who is calling: a service token, the admin token, or a customer's API key.

A key's owner never changes, so this process remembers owners it has looked up; whether
the key still works (revoked, expired, scopes) is state, and is read fresh on every
request — inside the enforcement script, or from the key's Redis projection.  Lookups
that fail are counted per client address, and an address that keeps guessing is
refused before it reaches Redis or PostgreSQL again.
"""

from __future__ import annotations

import contextlib
import hmac
from dataclasses import dataclass
from decimal import Decimal

import orjson
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.requests import Request

from schemas import redis_keys
from schemas.account_state import compile_inline
from schemas.events import utcnow
from schemas.plans import Per, RateLimit
from services.api.accounts import projection
from services.api.enforcement.limiter import Code, Limit, Limiter, Mode, Outcome
from services.api.enforcement.local import Buckets, Recent
from services.api.enforcement.refusals import refused
from services.common import keys
from services.common.keys import MalformedKey, Scope
from services.common.problems import unauthorized
from services.common.redis import UNREACHABLE
from services.common.settings import Settings


@dataclass(frozen=True, slots=True)
class Caller:
    customer: str | None  # None: a service token, acting for any customer
    key_id: str = ""

    @property
    def service(self) -> bool:
        return self.customer is None


def credential(request: Request) -> str | None:
    """``Authorization: Bearer <token>``, else ``X-API-Key``."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def address(request: Request) -> str:
    """The client's address (uvicorn resolves X-Forwarded-For from trusted proxies)."""
    return request.client.host if request.client else "unknown"


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: AsyncConnectionPool,
        limiter: Limiter,
        remembered: int = 100_000,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._pool = pool
        self._limiter = limiter
        self._services = [t.encode() for t in settings.service_tokens]
        self._owners: Recent[bytes, tuple[str, str]] = Recent(remembered)
        self._failures = compile_inline(
            (
                RateLimit(
                    name="auth-failures", limit=settings.ip_auth_failures_per_minute, per=Per.MINUTE
                ),
            )
        )
        self._per_address = settings.ip_limit_per_second
        self._addresses = Buckets()

    def limit_address(self, client: str) -> None:
        """The layer before authentication: requests per client address, counted by
        this process alone (as Envoy's local rate limit does) — a Redis round trip per
        request would cost more than this coarse guard is worth."""
        rate = self._per_address
        if not rate:
            return
        wait, bucket = self._addresses.take(client, 2 * rate, rate)
        if wait:
            limit = Limit(
                policy="per-address",
                kind="rate",
                limit=Decimal(rate),
                remaining=Decimal(0),
                reset_ms=int((2 * rate - bucket.tokens) / rate * 1000),
                retry_ms=int(wait * 1000) + 1,
                window_ms=1000,
                algorithm="token_bucket",
            )
            outcome = Outcome(Code.REFUSED, limits=(limit,), violated=limit)
            raise refused(outcome, "too many requests from this address")

    async def caller(self, token: str | None, client: str) -> Caller:
        if not token:
            raise unauthorized("send an API key as 'Authorization: Bearer <key>'")
        given = token.encode()
        if any(hmac.compare_digest(given, known) for known in self._services):
            return Caller(None)
        digest = keys.digest(self._settings.pepper, token)
        owner = self._owners.get(digest)
        if owner is None:
            owner = await self._look_up(token, digest, client)
            self._owners.put(digest, owner)
        return Caller(*owner)

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(
            (token or "").encode(), self._settings.admin_token.encode()
        )

    async def _look_up(self, token: str, digest: bytes, client: str) -> tuple[str, str]:
        """Redis's index first, then PostgreSQL; without Redis, PostgreSQL alone (and no
        brute-force accounting: the failure mode decides what happens next)."""
        with contextlib.suppress(*UNREACHABLE):
            failures = await self._limiter.limit_address(client, self._failures, Mode.PEEK)
            _raise_if_refused(failures)
        try:
            keys.check_format(token)
        except MalformedKey as exc:
            await self._failed(client)
            raise unauthorized(str(exc)) from None
        with contextlib.suppress(*UNREACHABLE):
            raw = await self._redis.get(redis_keys.key_owner(digest))
            if raw is not None:
                customer, key_id = (raw if isinstance(raw, str) else raw.decode()).split(" ")
                return customer, key_id
        async with self._pool.connection() as conn:
            found = await keys.holder(conn, digest)
        if found is None:
            await self._failed(client)
            raise unauthorized("unknown API key")
        with contextlib.suppress(*UNREACHABLE):
            await projection.remember_owner(self._redis, digest, found.customer, found.key_id)
        return found.customer, found.key_id

    async def _failed(self, client: str) -> None:
        with contextlib.suppress(*UNREACHABLE):
            await self._limiter.limit_address(client, self._failures, Mode.CHECK)

    async def require(self, caller: Caller, customer: str, scope: Scope | None = None) -> None:
        """For routes outside the enforcement script: may ``caller`` act on ``customer``
        (with ``scope``)?  A key's state is read fresh: revocation applies at once."""
        if caller.service:
            return
        if caller.customer != customer:
            raise keys.forbidden_customer()
        raw = await self._redis.hget(redis_keys.api_keys(customer), caller.key_id)
        if raw is None:
            await projection.project_customer(self._redis, self._pool, customer)
            raw = await self._redis.hget(redis_keys.api_keys(customer), caller.key_id)
        state = orjson.loads(raw) if raw else {"s": [], "r": True}
        keys.Holder.from_state(customer, caller.key_id, state).check(scope, utcnow())


def _raise_if_refused(outcome: Outcome) -> None:
    if not outcome.allowed and outcome.violated is not None:
        raise refused(outcome, "too many requests from this address")
