"""How long to wait before sending a batch again.

Exponential, so a struggling Tally is not hammered; jittered, so the emitters of a fleet
that lost Tally together do not all come back in the same instant; and a server's
``Retry-After`` wins, because it knows when it expects to recover.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of ``initial·factor^attempt`` seconds up to ``maximum``, each randomised
    over its upper half."""

    initial: float = 0.2
    factor: float = 2.0
    maximum: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.maximum, self.initial * self.factor**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES


def retry_after(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds, whether given as seconds or as an HTTP date;
    ``headers`` looked up by lower-case name (a dict of those, or ``httpx.Headers``)."""
    raw = headers.get("retry-after", "").strip()
    if not raw:
        return None
    if raw.isdigit():
        return float(raw)
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC, says RFC 5322
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())
