"""Portal tokens and the sessions they open: signed, expiring, stateless.

A portal token is minted by the seller for one customer (optionally for some of its
meters only) and travels in a link; the page trades it for a session cookie at once, so
the token leaves the address bar and the logs.  Both are signed under
``TALLY_PORTAL_SECRET``, each with its own purpose, so neither is accepted as the other
(nor as any other signed value): rotating the secret revokes every token and session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common.settings import Settings
from services.common.signed import Signer

TOKEN_PURPOSE = "portal-token"
SESSION_PURPOSE = "portal-session"


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token or session lets its bearer see: one customer, some meters or all."""

    customer: str
    meters: tuple[str, ...] | None  # None: every meter
    expires_at: datetime
    key_id: str | None = None  # a session opened with the customer's API key

    def shows(self, meter: str) -> bool:
        return self.meters is None or meter in self.meters

    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"sub": self.customer}
        if self.meters is not None:
            claims["meters"] = list(self.meters)
        if self.key_id is not None:
            claims["key"] = self.key_id
        return claims


def expiry(lifetime: timedelta) -> datetime:
    """When something lasting ``lifetime`` from now ends, in whole seconds (as signed)."""
    return datetime.fromtimestamp(int((datetime.now(UTC) + lifetime).timestamp()), UTC)


def mint(
    settings: Settings, customer: str, lifetime: timedelta, meters: tuple[str, ...] | None
) -> tuple[str, Grant]:
    """A portal token for ``customer`` that expires after ``lifetime``."""
    grant = Grant(customer, meters, expiry(lifetime))
    return _sign(settings, TOKEN_PURPOSE, grant), grant


def verify_token(settings: Settings, token: str) -> Grant | None:
    """The grant of an intact, unexpired portal token, else None."""
    return _grant(_signer(settings, TOKEN_PURPOSE).verify(token))


def open_session(settings: Settings, grant: Grant) -> str:
    """A session cookie's value: the grant, expiring when it does."""
    return _sign(settings, SESSION_PURPOSE, grant)


def verify_session(settings: Settings, value: str) -> Grant | None:
    return _grant(_signer(settings, SESSION_PURPOSE).verify(value))


def _sign(settings: Settings, purpose: str, grant: Grant) -> str:
    now = datetime.now(UTC)
    return _signer(settings, purpose).sign(grant.claims(), grant.expires_at - now, now)


def _signer(settings: Settings, purpose: str) -> Signer:
    return Signer(settings.portal_secret, purpose)


def _grant(claims: dict[str, Any] | None) -> Grant | None:
    """Claims as a grant; anything malformed (which a valid signature makes unlikely,
    but a signed value of another shape could be) is no grant."""
    if claims is None or not isinstance(claims.get("sub"), str):
        return None
    meters = claims.get("meters")
    if meters is not None and not (
        isinstance(meters, list) and all(isinstance(m, str) for m in meters)
    ):
        return None
    key = claims.get("key")
    return Grant(
        customer=claims["sub"],
        meters=None if meters is None else tuple(meters),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        key_id=key if isinstance(key, str) else None,
    )
