"""Who is calling: a service token, the admin token, or a customer's API key.

One authenticator for every service (ingest, billing, api) and route family, so that
guessing is limited everywhere alike.  A key's owner never changes, so this process
remembers owners it has looked up, and Redis indexes them for the other processes
(``redis_keys.key_owner``); whether the key still works (revoked, expired, scopes) is
state, and is read fresh on every request — inside the enforcement script, or from the
key's Redis projection (PostgreSQL when Redis lacks it).

Every credential that fails — a malformed or unknown key, a wrong service token, a
wrong admin token — counts against the client's address (``Failures``), and an address
that keeps guessing is refused with 429 before it reaches Redis or PostgreSQL again.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import time
from dataclasses import dataclass
from datetime import datetime

import orjson
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.requests import Request

from schemas import api_keys, redis_keys
from schemas.api_keys import Holder, MalformedKey, Refusal, Scope
from schemas.events import utcnow
from schemas.problem_types import FORBIDDEN, INSUFFICIENT_SCOPE, RATE_LIMITED
from services.common import postgres
from services.common.problems import Problem, unauthorized
from services.common.recent import Recent
from services.common.redis import UNREACHABLE
from services.common.settings import Settings

POLICY = "auth-failures"
WINDOW_SECONDS = 60
MISSING = "send a service token or API key as 'Authorization: Bearer <token>'"
ADMIN_NEEDED = "the admin API needs 'Authorization: Bearer <admin token>'"


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


class Failures:
    """Failed credentials per client address, counted in Redis so that every process
    of a deployment counts together: a fixed one-minute window that opens with an
    address's first failure (INCR and EXPIRE NX in one transaction).  Once an address
    has failed ``limit`` times in its window, it is refused until the window ends.

    A process also remembers the addresses it has seen refused and refuses them again
    without a round trip: that check comes before the service tokens are even compared,
    so a refused address cannot go on guessing those either.  Without Redis nothing is
    counted (the lookups themselves still reject what is wrong).  ``limit`` 0: off.
    """

    def __init__(self, redis: Redis, limit: int, remembered: int = 100_000) -> None:
        self._redis = redis
        self._limit = limit
        self._refused: Recent[str, float] = Recent(remembered)  # address → until (monotonic)

    def check_here(self, client: str) -> None:
        """Refuse an address this process has already seen refused (no round trip)."""
        until = self._refused.get(client)
        if until is not None and until > time.monotonic():
            raise self._refusal(until - time.monotonic())

    async def check(self, client: str) -> None:
        """Refuse an address over the limit, as Redis counts it: before any lookup."""
        self.check_here(client)
        if not self._limit:
            return
        key = redis_keys.auth_failures(client)
        with contextlib.suppress(*UNREACHABLE):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                count, ttl_ms = await pipe.execute()
            self._remember(client, int(count or 0), ttl_ms)
        self.check_here(client)

    async def failed(self, client: str) -> None:
        """Count one failure; the request that failed is answered with its 401 — or, past
        the limit, with the 429: concurrent guesses all pass ``check`` before any of
        them is counted, and would otherwise all be told 401 where the limit allows
        ``limit`` a minute."""
        if not self._limit:
            return
        key = redis_keys.auth_failures(client)
        with contextlib.suppress(*UNREACHABLE):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, WINDOW_SECONDS, nx=True)
                pipe.pttl(key)
                count, _, ttl_ms = await pipe.execute()
            self._remember(client, count, ttl_ms)
            if count > self._limit:
                self.check_here(client)

    def _remember(self, client: str, count: int, ttl_ms: int) -> None:
        if count >= self._limit:
            seconds = ttl_ms / 1000 if ttl_ms > 0 else WINDOW_SECONDS
            self._refused.put(client, time.monotonic() + seconds)

    def _refusal(self, wait: float) -> Problem:
        """429 with ``Retry-After`` and the IETF ``RateLimit`` fields, as enforcement
        refusals have them."""
        retry = max(1, math.ceil(wait))
        return Problem(
            RATE_LIMITED,
            f"too many failed credentials from this address ({self._limit} a minute):"
            f" retry after {retry} s",
            headers={
                "Retry-After": str(retry),
                "RateLimit-Policy": f'"{POLICY}";q={self._limit};w={WINDOW_SECONDS}',
                "RateLimit": f'"{POLICY}";r=0;t={retry}',
            },
            policy=POLICY,
            limit=self._limit,
            remaining=0,
            retry_after=retry,
        )


class Authenticator:
    """Service tokens, the admin token and customers' API keys, for every route."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: AsyncConnectionPool,
        remembered: int = 100_000,
    ) -> None:
        self._pepper = settings.pepper
        self._services = [t.encode() for t in settings.service_tokens]
        self._admin = settings.admin_token.encode()
        self._redis = redis
        self._pool = pool
        self._owners: Recent[bytes, tuple[str, str]] = Recent(remembered)
        self._failures = Failures(redis, settings.ip_auth_failures_per_minute, remembered)

    async def caller(self, token: str | None, client: str) -> Caller:
        """A service token (acting for anyone) or a customer's key; else 401, or 429 for
        an address that keeps guessing."""
        if not token:
            raise unauthorized(MISSING)
        self._failures.check_here(client)
        given = token.encode()
        if any(hmac.compare_digest(given, known) for known in self._services):
            return Caller(None)
        digest = api_keys.digest(self._pepper, token)
        owner = self._owners.get(digest)
        if owner is None:
            owner = await self._look_up(token, digest, client)
            self._owners.put(digest, owner)
        return Caller(*owner)

    async def authorize(
        self, request: Request, scope: Scope, customer: str | None = None
    ) -> Caller:
        """The caller of ``request``, allowed ``scope`` on ``customer`` (by default a
        key's own): a service token for anyone, a key for its own customer only."""
        caller = await self.caller(credential(request), address(request))
        if caller.customer is not None:
            await self.require(caller, customer or caller.customer, scope)
        return caller

    def is_admin(self, token: str | None) -> bool:
        """Is ``token`` the admin token? For routes that also take other credentials:
        a mismatch here is not a failure, the other checks count it."""
        return token is not None and hmac.compare_digest(token.encode(), self._admin)

    async def admin(self, token: str | None, client: str) -> None:
        """The admin token, or 401; a wrong one is a guess like any other."""
        if not token:
            raise unauthorized(ADMIN_NEEDED)
        await self._failures.check(client)
        if hmac.compare_digest(token.encode(), self._admin):
            return
        await self._failures.failed(client)
        raise unauthorized(ADMIN_NEEDED)

    async def _look_up(self, token: str, digest: bytes, client: str) -> tuple[str, str]:
        """Redis's index first, then PostgreSQL; without Redis, PostgreSQL alone (and no
        failure counting)."""
        await self._failures.check(client)
        try:
            _check_format(token)
        except MalformedKey as exc:
            await self._failures.failed(client)
            raise unauthorized(str(exc)) from None
        with contextlib.suppress(*UNREACHABLE):
            raw = await self._redis.get(redis_keys.key_owner(digest))
            if raw is not None:
                customer, key_id = (raw if isinstance(raw, str) else raw.decode()).split(" ")
                return customer, key_id
        async with postgres.reading(self._pool) as conn:  # one statement: no BEGIN, COMMIT
            found = await holder(conn, digest)
        if found is None:
            await self._failures.failed(client)
            raise unauthorized("unknown API key")
        with contextlib.suppress(*UNREACHABLE):
            await self._remember_owner(digest, found.customer, found.key_id)
        return found.customer, found.key_id

    async def _remember_owner(self, digest: bytes, customer: str, key_id: str) -> None:
        """Who a key belongs to never changes, so this index entry never goes stale."""
        await self._redis.set(redis_keys.key_owner(digest), f"{customer} {key_id}")

    async def require(self, caller: Caller, customer: str, scope: Scope | None = None) -> None:
        """May ``caller`` act on ``customer`` (with ``scope``)?  A key's state is read
        fresh: revocation applies at once."""
        if caller.service:
            return
        if caller.customer != customer:
            raise forbidden_customer()
        check_holder(await self._holder(customer, caller.key_id), scope, utcnow())

    async def _holder(self, customer: str, key_id: str) -> Holder:
        """The key's state: its Redis projection, else PostgreSQL (the truth) for a
        customer not projected yet or a Redis that cannot answer."""
        with contextlib.suppress(*UNREACHABLE):
            raw = await self._redis.hget(redis_keys.api_keys(customer), key_id)
            if raw is not None:
                return Holder.from_state(customer, key_id, orjson.loads(raw))
        async with postgres.reading(self._pool) as conn:
            found = await holder_of(conn, key_id)
        if found is None or found.customer != customer:
            return Holder.from_state(customer, key_id, {"s": [], "r": True})
        return found


def _check_format(token: str) -> None:
    """``api_keys.check_format``, with a plainer word for what is no Tally key at all."""
    if not token.startswith("tally_"):
        raise MalformedKey(
            "not a valid service token, nor an API key (tally_live_… or tally_test_…)"
        )
    api_keys.check_format(token)


def check_holder(holder: Holder, scope: Scope | None, now: datetime) -> None:
    """Raise the problem (401, 403) that keeps ``holder``'s key from ``scope`` now."""
    match holder.refusal(scope, now):
        case Refusal.REVOKED:
            raise unauthorized("the API key was revoked")
        case Refusal.EXPIRED:
            raise unauthorized("the API key has expired")
        case Refusal.SCOPE:
            assert scope is not None
            raise insufficient_scope(scope)


def insufficient_scope(scope: Scope) -> Problem:
    return Problem(
        INSUFFICIENT_SCOPE,
        f"this API key lacks the {scope.value!r} scope",
        scope=scope.value,
    )


def forbidden_customer() -> Problem:
    return Problem(
        FORBIDDEN,
        "this API key belongs to another customer",
    )


async def holder(conn: AsyncConnection, key_digest: bytes) -> Holder | None:
    """Who holds the key with this digest (a lookup by the secret)."""
    return await _holder(conn, "hash", key_digest)


async def holder_of(conn: AsyncConnection, key_id: str) -> Holder | None:
    """The key with this id, as PostgreSQL has it now (a lookup by the key's id)."""
    return await _holder(conn, "id", key_id)


async def _holder(conn: AsyncConnection, column: str, value: bytes | str) -> Holder | None:
    cur = await conn.execute(
        sql.SQL(
            "SELECT customer_id, id, scopes, expires_at, revoked_at FROM api_keys WHERE {} = %s"
        ).format(sql.Identifier(column)),
        (value,),
    )
    row = await cur.fetchone()
    return Holder(row[0], row[1], tuple(row[2]), row[3], row[4]) if row else None
