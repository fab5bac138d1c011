"""The local side of leases: what one process holds for one (key, meter, endpoint).

Pure bookkeeping, no I/O, so it can be checked against a naive model (a hypothesis
test does): a call is admitted only from a term with units left and time left, each
admission counts once in that term's ``spent``, and a term is never spent from again
once it is handed back for renewal or return, so the ``spent`` Tally hears is exactly
what was admitted.

Terms are double-buffered: while ``active`` is spent, the next term is fetched ahead
into ``ready`` by renewing a finished one (``spare``), so a busy customer's calls do
not wait for a round trip when a term runs out.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from tally_sdk.decision import Decision


@dataclass(slots=True)
class Term:
    """One grant of a lease: ``granted`` calls, admitted until ``deadline`` (local
    monotonic clock, already shortened for clock skew)."""

    lease: str
    granted: int
    deadline: float
    admitted: Decision
    spent: int = 0
    number: int = 1  # the lease's first term is 1; renewing it asks for number + 1
    renew_at: int = sys.maxsize
    """How many spent calls make the next term due, fetched ahead by the holder (which
    sets it with the grant); by default never ahead, only once this term is done."""
    renew_after: float = math.inf
    """The local time from which the next term is due whatever is spent (as above)."""

    def left(self, now: float) -> int:
        return self.granted - self.spent if now < self.deadline else 0


@dataclass(slots=True)
class Holding:
    active: Term | None = None
    ready: Term | None = None
    spare: Term | None = None
    """A finished term whose ``spent`` is final: the next fetch renews its lease."""
    retired: list[Term] = field(default_factory=list)
    """Finished terms to return (there was a spare already)."""

    def spend(self, now: float) -> Decision | None:
        """Admit one call if a term has room: the fast path, no I/O."""
        term = self.active
        if term is None or term.spent >= term.granted or now >= term.deadline:  # left() <= 0
            term = self._advance(now)
            if term is None:
                return None
        term.spent += 1
        return term.admitted

    def left(self, now: float) -> int:
        return sum(t.left(now) for t in (self.active, self.ready) if t is not None)

    def add(self, term: Term, now: float) -> None:
        """A term just granted: spent next, after the active one if that has room."""
        if self.active is None or self.active.left(now) <= 0:
            if self.active is not None:
                self._retire(self.active)
            self.active = term
        else:
            if self.ready is not None:
                self._retire(self.ready)
            self.ready = term

    def renewal(self) -> Term | None:
        """The finished term the next lease request renews (its lease keeps its id)."""
        spare, self.spare = self.spare, None
        return spare

    def finished(self) -> list[Term]:
        """Every term, handed back to be returned: none is spent from again."""
        terms = [t for t in (self.active, self.ready, self.spare) if t is not None]
        terms += self.retired
        self.active = self.ready = self.spare = None
        self.retired = []
        return terms

    def put_back(self, term: Term) -> None:
        """A renewal of ``term`` that failed: renew it next (the same request again, which
        Tally answers as it did if it was granted after all); a term that finished
        meanwhile is returned instead of overwritten."""
        if self.spare is not None:
            self.retired.append(self.spare)
        self.spare = term

    def take_retired(self) -> list[Term]:
        retired, self.retired = self.retired, []
        return retired

    def _advance(self, now: float) -> Term | None:
        if self.active is not None:
            self._retire(self.active)
            self.active = None
        ready, self.ready = self.ready, None
        if ready is None:
            return None
        self.active = ready
        return ready if ready.left(now) > 0 else self._advance(now)

    def _retire(self, term: Term) -> None:
        if self.spare is None:
            self.spare = term
        else:
            self.retired.append(term)
