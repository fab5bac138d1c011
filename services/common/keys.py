"""API key format: what a key looks like, and how it is stored.

A key is ``tally_live_`` or ``tally_test_``, 43 base62 characters of a 256-bit random
secret, and a 6-character CRC32 checksum of them.  The fixed prefix lets secret
scanners find leaked keys; the checksum lets them (and us) reject a mistyped or
made-up key without a lookup.  Only ``HMAC-SHA-256(pepper, key)`` is stored: the pepper
lives in the server's configuration, not in the database, so a leaked table alone
cannot be brute-forced, and unlike bcrypt the hash costs a microsecond on the hot path.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from psycopg import AsyncConnection, sql

from services.common.problems import Problem, unauthorized

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_CHARS = 43  # 62**43 > 2**256
CHECKSUM_CHARS = 6  # 62**6 > 2**32
KEY_PATTERN = re.compile(rf"^tally_(live|test)_([0-9A-Za-z]{{{SECRET_CHARS + CHECKSUM_CHARS}}})$")


class Environment(StrEnum):
    LIVE = "live"
    TEST = "test"


class Scope(StrEnum):
    INGEST = "ingest"
    ENFORCE = "enforce"
    USAGE_READ = "usage:read"
    KEYS = "keys"  # manage the customer's keys
    BILLING = "billing"  # open Stripe Checkout and the billing portal


ALL_SCOPES = (Scope.INGEST, Scope.ENFORCE, Scope.USAGE_READ, Scope.KEYS, Scope.BILLING)


class MalformedKey(ValueError):
    """Not a Tally key at all: wrong prefix, length, alphabet or checksum."""


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str  # shown once, never stored
    prefix: str

    @property
    def last4(self) -> str:
        return self.secret[-4:]


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_CHARS)


def generate(environment: Environment = Environment.LIVE) -> NewKey:
    body = _base62(secrets.randbits(256), SECRET_CHARS)
    prefix = f"tally_{environment.value}_"
    return NewKey(secret=prefix + body + _checksum(body), prefix=prefix)


def check_format(key: str) -> None:
    """Raise ``MalformedKey`` unless ``key`` could have been issued by ``generate``."""
    found = KEY_PATTERN.match(key)
    if not found:
        raise MalformedKey("not a Tally API key (expected tally_live_… or tally_test_…)")
    body, checksum = found[2][:SECRET_CHARS], found[2][SECRET_CHARS:]
    if not hmac.compare_digest(_checksum(body), checksum):
        raise MalformedKey("the key's checksum does not match: it was mistyped or truncated")


def digest(pepper: bytes, key: str) -> bytes:
    return hmac.new(pepper, key.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a key, and what it may do, as PostgreSQL (the truth) has it now."""

    customer: str
    key_id: str
    scopes: tuple[str, ...]
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self) -> dict[str, Any]:
        """The key's Redis projection, as the enforcement script reads it:
        ``{s: scopes, x: expires (ms), r: revoked}`` (see ``schemas.redis_keys``)."""
        state: dict[str, Any] = {"s": list(self.scopes)}
        if self.expires_at is not None:
            state["x"] = int(self.expires_at.timestamp() * 1000)
        if self.revoked_at is not None:
            state["r"] = True
        return state

    @classmethod
    def from_state(cls, customer: str, key_id: str, state: Mapping[str, Any]) -> Holder:
        """Back from the projection (a revoked key's time is not kept there)."""
        expires = state.get("x")
        return cls(
            customer,
            key_id,
            tuple(state["s"]),
            datetime.fromtimestamp(expires / 1000, UTC) if expires is not None else None,
            datetime.fromtimestamp(0, UTC) if state.get("r") else None,
        )

    def check(self, scope: Scope | None, now: datetime) -> None:
        """Raise the problem (401, 403) that keeps this key from ``scope`` now."""
        if self.revoked_at is not None:
            raise unauthorized("the API key was revoked")
        if self.expires_at is not None and self.expires_at <= now:
            raise unauthorized("the API key has expired")
        if scope is not None and scope.value not in self.scopes:
            raise insufficient_scope(scope)


def insufficient_scope(scope: Scope) -> Problem:
    return Problem(
        403,
        "insufficient-scope",
        "Insufficient scope",
        f"this API key lacks the {scope.value!r} scope",
        scope=scope.value,
    )


def check_grant(grantor: Holder, scopes: Iterable[str], expires_at: datetime | None) -> None:
    """Raise 403 ``scope-escalation`` unless ``grantor`` may hand out a key with ``scopes``
    that expires at ``expires_at`` (``None``: never).

    A customer's key passes on only what it holds: scopes it has, a lifetime no longer
    than its own.  Creating a key and rotating one both issue a key, so both ask here;
    otherwise a narrow or short-lived key (a leaked one, say) mints a wider, longer-lived
    one.  Service and admin tokens act for the seller and do not ask.
    """
    asked = {str(s) for s in scopes}
    reasons: list[str] = []
    extra: dict[str, Any] = {}
    excess = [s.value for s in ALL_SCOPES if s.value in asked and s.value not in grantor.scopes]
    if excess:
        reasons.append(f"scopes it lacks ({', '.join(excess)})")
        extra["scopes"] = excess
    limit = grantor.expires_at
    if limit is not None and (expires_at is None or expires_at > limit):
        asked_expiry = expires_at.isoformat() if expires_at else None
        reasons.append(
            f"an expiry ({asked_expiry or 'never'}) later than its own ({limit.isoformat()})"
        )
        extra |= {"expires_at": asked_expiry, "caller_expires_at": limit.isoformat()}
    if reasons:
        raise Problem(
            403,
            "scope-escalation",
            "Scope escalation",
            f"this API key cannot issue a key with {' and '.join(reasons)}",
            **extra,
        )


def forbidden_customer() -> Problem:
    return Problem(
        403,
        "forbidden",
        "Forbidden",
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
