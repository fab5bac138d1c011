"""The limiter of last resort, for when Redis cannot be reached and the server fails open.

Each customer keeps to the rate limits its last decision reported (a customer never
seen gets ``default_per_minute``), counted in this process only: with N API servers a
customer may get up to N times its limit while Redis is down.  Quotas are not checked:
failing open means admitting.  Decisions made here show in ``/metrics``.
"""

from __future__ import annotations

from decimal import Decimal

from services.api.enforcement.limiter import Code, Limit, Outcome
from services.api.enforcement.local import Buckets
from services.common.recent import Recent


class Fallback:
    def __init__(self, default_per_minute: int, remembered: int = 10_000) -> None:
        self._default = (("fallback", default_per_minute, 60_000),)
        self._seen: Recent[str, tuple[Limit, ...]] = Recent(remembered)
        self._buckets = Buckets(remembered)

    def remember(self, customer: str, outcome: Outcome) -> None:
        """Called on every decision: keeps a reference, works out nothing."""
        self._seen.put(customer, outcome.limits)

    def _rates(self, customer: str) -> tuple[tuple[str, int, int], ...]:
        seen = self._seen.get(customer) or ()
        rates = tuple(
            (lim.policy, int(lim.limit), lim.window_ms) for lim in seen if lim.kind == "rate"
        )
        return rates or self._default

    def decide(self, customer: str) -> Outcome:
        limits, violated = [], None
        for policy, limit, window_ms in self._rates(customer):
            per_second = limit * 1000 / window_ms
            wait, bucket = self._buckets.take(f"{customer}\x00{policy}", limit, per_second)
            found = Limit(
                policy=policy,
                kind="rate",
                limit=Decimal(limit),
                remaining=Decimal(int(bucket.tokens)),
                reset_ms=int((limit - bucket.tokens) / per_second * 1000),
                retry_ms=int(wait * 1000),
                window_ms=window_ms,
                algorithm="token_bucket",
            )
            limits.append(found)
            if wait and violated is None:
                violated = found
        code = Code.OK if violated is None else Code.REFUSED
        return Outcome(code=code, limits=tuple(limits), violated=violated)
