"""The layer before authentication: requests per client address.

Authentication itself (service tokens, the admin token, customers' keys, failed
guesses per address) is every service's alike: ``services.common.auth``.
"""

from __future__ import annotations

from decimal import Decimal

from services.api.enforcement.limiter import Code, Limit, Outcome
from services.api.enforcement.local import Buckets
from services.api.enforcement.refusals import refused


class AddressLimit:
    def __init__(self, per_second: int) -> None:
        """``per_second`` 0: off."""
        self._per_second = per_second
        self._addresses = Buckets()

    def check(self, client: str) -> None:
        """Requests per client address, counted by this process alone (as Envoy's local
        rate limit does) — a Redis round trip per request would cost more than this
        coarse guard is worth."""
        rate = self._per_second
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
