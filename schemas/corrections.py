"""A usage correction: a signed change to what a meter counted for one customer.

Raw events are never edited or deleted.  A correction is an event of its own, of the
reserved type ``tally.correction``, that travels the path every event travels (ingest's
write-ahead log, Kafka, the aggregator's exactly-once Lua call, ClickHouse) and that
every count adds: the live counters at the corrected minute, hence quotas and the usage
API, and the rollups through the meter's SQL, hence invoices.  Only additive meters
(``sum``, ``count``) take corrections: a maximum, minimum, latest value, average or
distinct count has no delta that means the same thing live and in SQL.

The event carries the signed delta as its ``value`` and, as its ``data`` text,
``{"meter": …, "groups": {group name: value}, "reason": …}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

TYPE = "tally.correction"
SOURCE = "tally/corrections"
RESERVED_TYPE_PREFIX = "tally."
"""Event types Tally writes itself: an emitter may not send them (a forged correction)."""
HOLD_SECONDS = 2 * 86_400
"""How long the hold of an accepted decrease lives unless counted (``redis_keys.
correction_holds``): a decrease whose event never arrived stops binding then."""


@dataclass(frozen=True, slots=True)
class CorrectionEvent:
    """A correction as an event ingest publishes (``schemas.envelope.EventLike``)."""

    id: str
    subject: str
    time: datetime
    delta: Decimal
    meter: str
    groups: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    source: str = SOURCE
    type: str = TYPE
    lease: str = ""

    @property
    def value(self) -> Decimal:
        return self.delta

    @property
    def dimensions(self) -> dict[str, str]:
        return {}

    @property
    def data(self) -> str:
        body = {"meter": self.meter, "groups": self.groups, "reason": self.reason}
        return orjson.dumps(body).decode()

    def wire(self) -> tuple[dict[str, str], str]:
        return self.dimensions, self.data


@dataclass(frozen=True, slots=True)
class Target:
    """What a stored correction event corrects: a meter and its group values by name."""

    meter: str
    groups: dict[str, str]


def target(data: str) -> Target | None:
    """The meter and groups a correction event's ``data`` names (None when malformed:
    only ingest writes these, so that is a bug upstream, never a reason to crash)."""
    try:
        body: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("meter"), str):
        return None
    groups = body.get("groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(v, str) for v in groups.values()):
        return None
    return Target(body["meter"], groups)
