"""API keys as every service sees them: the format, the scopes, and who holds a key.

Accounts issues keys; every service verifies them (``services.common.auth``), so what a
key looks like and what its projection holds is a contract, kept here.

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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

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


class Refusal(StrEnum):
    REVOKED = "revoked"
    EXPIRED = "expired"
    SCOPE = "scope"


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

    def refusal(self, scope: Scope | None, now: datetime) -> Refusal | None:
        """What keeps this key from ``scope`` now, if anything."""
        if self.revoked_at is not None:
            return Refusal.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return Refusal.EXPIRED
        if scope is not None and scope.value not in self.scopes:
            return Refusal.SCOPE
        return None
