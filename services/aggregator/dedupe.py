"""Dropping client retries by (source, id) within a window, in bounded memory.

Each event's key is hashed to 8 bytes (BLAKE2b) and kept in a Redis set per customer
and processing-time bucket.  Buckets expire one bucket after the window ends, so
memory is bounded by the ids seen in one window.  A 64-bit digest makes a false
"duplicate" vanishingly rare (about 1 in 3·10^7 after a billion ids of one customer
within one window), and ClickHouse, the billing record, collapses on the full key anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas import redis_keys


@dataclass(frozen=True, slots=True)
class DedupeWindow:
    """The window split into ``parts`` buckets; a key is looked up in all live ones."""

    window: timedelta
    parts: int = 6

    @property
    def bucket_seconds(self) -> int:
        return max(1, math.ceil(self.window.total_seconds() / self.parts))

    def current(self, now: datetime) -> int:
        return int(now.timestamp()) // self.bucket_seconds

    def live(self, now: datetime) -> list[int]:
        """Buckets that may hold keys seen within the window, newest first."""
        current = self.current(now)
        return [current - i for i in range(self.parts + 1)]

    def expires_at(self, bucket: int) -> int:
        """Unix time after which a bucket can no longer be inside the window."""
        return (bucket + 1) * self.bucket_seconds + int(self.window.total_seconds())

    def key(self, customer: str, bucket: int) -> str:
        return redis_keys.seen(customer, str(bucket))
