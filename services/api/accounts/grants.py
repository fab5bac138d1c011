"""What a customer's key may hand out: never more than it holds itself."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from schemas.api_keys import ALL_SCOPES, Holder
from schemas.problem_types import SCOPE_ESCALATION
from services.common.problems import Problem


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
            SCOPE_ESCALATION,
            f"this API key cannot issue a key with {' and '.join(reasons)}",
            **extra,
        )
