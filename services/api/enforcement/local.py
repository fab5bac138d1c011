"""In-process token buckets: limits one API process can keep on its own.

Used where a Redis round trip would cost more than the limit is worth, or is not
possible: the per-address layer before authentication (like Envoy's local rate limit,
each API process counts its own share) and the fallback while Redis is unreachable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.recent import Recent


@dataclass(slots=True)
class Bucket:
    capacity: float
    per_second: float
    tokens: float
    at: float

    def take(self, now: float, cost: float = 1) -> float:
        """0 when admitted, else the seconds until ``cost`` tokens will be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.per_second


class Buckets:
    """One bucket per name."""

    def __init__(self, size: int = 100_000) -> None:
        self._buckets: Recent[str, Bucket] = Recent(size)

    def take(self, name: str, capacity: float, per_second: float) -> tuple[float, Bucket]:
        now = time.monotonic()
        bucket = self._buckets.get(name)
        if bucket is None or bucket.capacity != capacity or bucket.per_second != per_second:
            bucket = Bucket(capacity, per_second, capacity, now)
            self._buckets.put(name, bucket)
        return bucket.take(now), bucket
