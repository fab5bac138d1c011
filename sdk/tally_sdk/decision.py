"""Tally's answer to "may this customer do this now?".

A refusal (429 rate limit or quota, 403 inactive account or missing scope) is an
answer, not a failure, so it is a ``Decision`` with ``allowed=False`` rather than an
exception: the caller's normal path is to relay it.  ``headers`` holds the IETF
RateLimit headers Tally computed, ready to copy onto the caller's own response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tally_sdk.errors import Response, problem_of

LEGACY_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
"""Answered too when the customer's plan asks for them (`legacy_ratelimit_headers`)."""
RELAYED = ("RateLimit", "RateLimit-Policy", "Retry-After", *LEGACY_HEADERS)
RELAYED_HEADERS = tuple((h, h.lower()) for h in RELAYED)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int
    customer: str | None = None
    plan: str | None = None
    policy: str | None = None
    """The policy that refused, or ``None`` when allowed."""
    remaining: Decimal | None = None
    """The tightest remaining allowance among the policies applied."""
    reset: int | None = None
    """Seconds until that policy's window resets."""
    retry_after: int | None = None
    limits: list[dict[str, Any]] = field(default_factory=list)
    reservation: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    problem: dict[str, Any] | None = None
    """The problem+json body of a refusal."""
    body: dict[str, Any] = field(default_factory=dict)
    lease: str | None = None
    """The lease an allowed call was admitted from: its usage event carries it
    (``tallylease``), which settles the unit the lease held."""
    added_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)
    """``headers`` but ``Retry-After``, ASGI-encoded: what an allowed response gets.  Made
    once per decision, as every call a lease's term admits shares its decision."""

    def __post_init__(self) -> None:
        added = tuple(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in self.headers.items()
            if name != "Retry-After"
        )
        object.__setattr__(self, "added_headers", added)

    @classmethod
    def from_response(cls, response: Response) -> Decision:
        """The decision in a 200, 403 or 429 answer of ``/v1/enforce``."""
        body = problem_of(response) or {}
        return cls.from_answer(response.status_code, response.headers, body)

    @classmethod
    def from_answer(cls, status: int, headers: Mapping[str, str], body: dict[str, Any]) -> Decision:
        """The decision in an answer already read: ``headers`` looked up by lower-case
        name (an ``httpx.Headers`` or a dict of lower-case names)."""
        refused = status != 200
        return cls(
            allowed=bool(body.get("allowed", not refused)) and not refused,
            status=status,
            customer=body.get("customer"),
            plan=body.get("plan"),
            policy=body.get("policy"),
            remaining=_decimal(body.get("remaining")),
            reset=_int(body.get("reset")),
            retry_after=_int(body.get("retry_after")),
            limits=list(body.get("limits") or []),
            reservation=body.get("reservation"),
            headers={h: headers[low] for h, low in RELAYED_HEADERS if low in headers},
            problem=body if refused else None,
            body=body,
        )


def _decimal(raw: Any) -> Decimal | None:
    return None if raw is None else Decimal(str(raw))


def _int(raw: Any) -> int | None:
    return None if raw is None else int(raw)
