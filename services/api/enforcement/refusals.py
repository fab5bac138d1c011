"""How a decision is told: the body, the IETF ``RateLimit`` fields, problem+json refusals.

Header syntax follows draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Policy`` lists
every policy that applied (``q`` quota units in ``w`` seconds), ``RateLimit`` the one
closest to refusing (``r`` remaining, ``t`` seconds until it resets).
"""

from __future__ import annotations

import math
import time
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from schemas.problem_types import QUOTA_EXCEEDED, RATE_LIMITED
from services.api.enforcement.limiter import Limit, Outcome
from services.common.problems import Problem


def _units(amount: Decimal) -> int:
    return int(amount.to_integral_value(ROUND_FLOOR))


def _number(amount: Decimal) -> int | str:
    """Whole amounts as JSON numbers, fractional ones as decimal strings."""
    return int(amount) if amount == amount.to_integral_value() else str(amount.normalize())


def tightest(outcome: Outcome) -> Limit | None:
    if outcome.violated is not None:
        return outcome.violated
    if not outcome.limits:
        return None
    return min(outcome.limits, key=_closeness)


def _closeness(lim: Limit) -> tuple[Decimal, int]:
    """How near a policy is to refusing: the share of it left, then the time to reset."""
    return lim.remaining / max(lim.limit, Decimal(1)), lim.reset_ms


def headers(outcome: Outcome) -> dict[str, str]:
    if not outcome.limits:
        return {}
    policies = ", ".join(
        f'"{lim.policy}";q={_units(lim.limit)};w={lim.window}' for lim in outcome.limits
    )
    closest = tightest(outcome)
    assert closest is not None
    found = {
        "RateLimit-Policy": policies,
        "RateLimit": f'"{closest.policy}";r={_units(closest.remaining)};t={closest.reset}',
    }
    if outcome.violated is not None:
        found["Retry-After"] = str(outcome.violated.retry_after)
    if outcome.legacy_headers:
        found |= legacy(closest, time.time())
    return found


def legacy(closest: Limit, now: float) -> dict[str, str]:
    """The ``X-RateLimit-*`` fields of clients written before the IETF draft (GitHub's
    convention: ``Reset`` in Unix seconds), for the same policy ``RateLimit`` names."""
    return {
        "X-RateLimit-Limit": str(_units(closest.limit)),
        "X-RateLimit-Remaining": str(_units(closest.remaining)),
        "X-RateLimit-Reset": str(math.ceil(now + closest.reset)),
    }


def limit_json(lim: Limit) -> dict[str, Any]:
    body: dict[str, Any] = {
        "policy": lim.policy,
        "kind": lim.kind,
        "limit": _number(lim.limit),
        "remaining": _number(lim.remaining),
        "reset": lim.reset,
        "window": lim.window,
    }
    if lim.algorithm:
        body["algorithm"] = lim.algorithm
    if lim.hard is not None:
        body["hard"] = lim.hard
    return body


def decision(outcome: Outcome, customer: str | None) -> dict[str, Any]:
    closest = tightest(outcome)
    violated = outcome.violated
    return {
        "allowed": outcome.allowed,
        "customer": customer,
        "plan": outcome.plan or None,
        "account_status": outcome.status or None,
        "policy": violated.policy if violated else None,
        "remaining": _number(closest.remaining) if closest else None,
        "reset": closest.reset if closest else None,
        "retry_after": violated.retry_after if violated else None,
        "limits": [limit_json(lim) for lim in outcome.limits],
    }


def refused(outcome: Outcome, detail: str, customer: str | None = None) -> Problem:
    """429 naming the violated policy and, when the plan has one, the way up."""
    violated = outcome.violated
    assert violated is not None
    quota = violated.kind == "quota"
    upgrade = None
    if outcome.upgrade:
        upgrade = {
            "plan": outcome.upgrade,
            "detail": f"upgrade to the {outcome.upgrade!r} plan for higher limits",
        }
    body = decision(outcome, customer) | {"upgrade": upgrade}
    return Problem(
        QUOTA_EXCEEDED if quota else RATE_LIMITED,
        detail,
        headers=headers(outcome),
        **body,
    )
