"""What became of emitted events, for the events that did not make it and for dashboards.

``emit`` returns before anything is sent, so a failure can only be reported afterwards:
every undelivered event is logged, counted in ``EmitStats`` and handed to the client's
``on_undelivered`` callback — never lost without a trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger("tally_sdk")


class Outcome(StrEnum):
    """Why an event was not delivered."""

    REJECTED = "rejected"
    """Ingest judged this event invalid; ``errors`` says which field and why."""
    REFUSED = "refused"
    """Ingest refused the whole request (bad token, too large…); ``problem`` says why."""
    DROPPED = "dropped"
    """The buffer was full and ``overflow="drop_oldest"`` made room for a newer event."""
    ABANDONED = "abandoned"
    """Still unsent when ``aclose`` ran out of time; it may or may not have arrived."""


@dataclass(frozen=True, slots=True)
class Undelivered:
    event: dict[str, Any]
    outcome: Outcome
    status: int | None = None
    errors: list[dict[str, str]] = field(default_factory=list)
    problem: dict[str, Any] | None = None

    def describe(self) -> str:
        reasons = "; ".join(f"{e.get('field')}: {e.get('reason')}" for e in self.errors)
        detail = reasons or (self.problem or {}).get("detail") or ""
        status = f" ({self.status})" if self.status else ""
        return f"event {self.event.get('id')} {self.outcome}{status}: {detail}".rstrip(": ")


OnUndelivered = Callable[[Undelivered], None]


@dataclass(slots=True)
class EmitStats:
    """Counters since the client was created; ``pending`` is ``emitted`` minus the rest."""

    emitted: int = 0
    accepted: int = 0
    duplicates: int = 0  # repeated within one request: the first copy counts
    rejected: int = 0
    refused: int = 0
    dropped: int = 0
    abandoned: int = 0
    requests: int = 0  # POSTs attempted, answered or not
    retries: int = 0

    @property
    def pending(self) -> int:
        settled = self.accepted + self.duplicates + self.undelivered
        return self.emitted - settled

    @property
    def undelivered(self) -> int:
        return self.rejected + self.refused + self.dropped + self.abandoned


class Reporter:
    """Counts, logs and forwards undelivered events.

    One log line per batch, not per event: a refused batch of 500 is one problem.  A
    failing callback is logged, not raised, because it runs in the background sender,
    which must keep going.
    """

    def __init__(self, callback: OnUndelivered | None) -> None:
        self.stats = EmitStats()
        self._callback = callback

    def undelivered(self, reports: list[Undelivered]) -> None:
        if not reports:
            return
        for report in reports:
            counter = str(report.outcome)  # each outcome has the counter of its name
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if reports[0].outcome is not Outcome.DROPPED or self.stats.dropped % 1000 == 1:
            more = f" (and {len(reports) - 1} more)" if len(reports) > 1 else ""
            log.warning("tally: %s%s", reports[0].describe(), more)
        for report in reports:
            self._forward(report)

    def _forward(self, report: Undelivered) -> None:
        if self._callback is None:
            return
        try:
            self._callback(report)
        except Exception:
            log.exception("tally: the on_undelivered callback failed")
