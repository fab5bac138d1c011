"""Trials per calendar month: started, converted, expired.

A trial *starts* when a customer's status becomes ``trial``; it *ends* when the status
becomes anything else.  It *converted* if the subscription it ends into is worth MRR
(active or past_due on a plan with a fee: the customer pays); it *expired* otherwise
(downgraded to a free plan, suspended or cancelled).  A month's conversion rate is its
converted trials over the trials that ended in it; no trial ended, no rate.

Tally ends an unpaid trial when it notices it ran out (the customer's next decision or
the lifecycle scan), so a trial past its end date still counts as running until then.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.billing.invoicing.compose import State
from services.billing.revenue.movements import Month
from services.billing.revenue.mrr import FeeBook, value

TRIAL = "trial"


@dataclass(slots=True)
class TrialMonth:
    started: int = 0
    converted: int = 0
    expired: int = 0

    @property
    def conversion_rate(self) -> Decimal | None:
        """Converted over ended, as a fraction with four decimals (half even)."""
        ended = self.converted + self.expired
        return round(Decimal(self.converted) / ended, 4) if ended else None


def _month_of(instant: datetime, months: Sequence[Month]) -> int | None:
    for index, (start, end) in enumerate(months):
        if start <= instant < end:
            return index
    return None


def monthly(
    histories: Iterable[Sequence[State]],
    book: FeeBook,
    months: Sequence[Month],
    found: list[TrialMonth] | None = None,
) -> list[TrialMonth]:
    """Trials started, converted and expired in each of ``months`` (added to ``found``,
    when given)."""
    found = [TrialMonth() for _ in months] if found is None else found
    for states in histories:
        before = None
        for state in states:
            index = _month_of(state.at, months)
            if state.status == TRIAL and before != TRIAL and index is not None:
                found[index].started += 1
            if before == TRIAL and state.status != TRIAL and index is not None:
                if value(state, book, state.at) is not None:
                    found[index].converted += 1
                else:
                    found[index].expired += 1
            before = state.status
    return found
