"""Signed, expiring values under ``TALLY_PORTAL_SECRET``: portal tokens and the
dashboards' session cookies.

They are stateless, so the way to revoke all of them at once is to rotate the secret.
Each use names its *purpose* (a salt), so a value signed for one use — a portal token, a
seller's session — is never accepted as another.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer


class Signer:
    """Sign a JSON object with an expiry; read it back only if intact and unexpired."""

    def __init__(self, secret: str, purpose: str) -> None:
        self._serializer = URLSafeSerializer(secret, salt=purpose)

    def sign(self, claims: dict[str, Any], lifetime: timedelta, now: datetime | None = None) -> str:
        """``claims`` plus ``exp`` (Unix seconds), signed."""
        expires = (now or datetime.now(UTC)) + lifetime
        return self._serializer.dumps({**claims, "exp": int(expires.timestamp())})

    def verify(self, token: str, now: datetime | None = None) -> dict[str, Any] | None:
        """The claims of a token this signer made and that has not expired, else None."""
        try:
            claims = self._serializer.loads(token)
        except BadSignature:
            return None
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int):
            return None
        if claims["exp"] <= (now or datetime.now(UTC)).timestamp():
            return None
        return claims
