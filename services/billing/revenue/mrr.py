"""Committed MRR: what a subscription's recurring plan fee is worth a month.

A customer's MRR at an instant is the fee of the plan version in effect then, normalised
to a month (a yearly fee / 12) and rounded once, half up, to the currency's minor unit —
so 2,000 a year is 166.67 a month, and every sum of MRR is a sum of rounded amounts that
adds up on paper.  Only ``active`` and ``past_due`` subscriptions count (Stripe's rule):
a trial, a suspended or a cancelled one is worth nothing.  Usage is never MRR.

A plan version takes effect at its ``changed_at`` (a customer on the plan before its
first version saved is valued at the first version, as the billing run rates it).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, localcontext

from psycopg import AsyncConnection

from schemas.plans import Interval, Plan
from services.billing.invoicing import subscriptions
from services.billing.invoicing.compose import FEE_STATUSES, State
from services.billing.rating.money import EXACT, round_line

MONTHS_IN = {Interval.MONTH: 1, Interval.YEAR: 12}


@dataclass(frozen=True, slots=True)
class Mrr:
    """A positive monthly amount in one currency (no MRR is ``None``, never 0)."""

    currency: str
    amount: Decimal


def monthly(plan: Plan) -> Mrr | None:
    """The plan's recurring fee a month, rounded to the currency's minor unit."""
    with localcontext(EXACT):
        amount = round_line(plan.price / MONTHS_IN[plan.interval], plan.currency)
    return Mrr(plan.currency, amount) if amount > 0 else None


class FeeBook:
    """Every version of every plan's monthly fee, to answer "what was this plan's fee
    worth at this instant" and "when did it change"."""

    def __init__(self, versions: Mapping[str, Sequence[tuple[datetime, Plan]]]) -> None:
        self._changed = {pid: [at for at, _ in rows] for pid, rows in versions.items()}
        self._fees = {pid: [monthly(plan) for _, plan in rows] for pid, rows in versions.items()}

    def at(self, plan_id: str, instant: datetime) -> Mrr | None:
        """The fee of the version in effect at ``instant`` (None for an unknown plan)."""
        changed = self._changed.get(plan_id)
        if not changed:
            return None
        return self._fees[plan_id][max(bisect_right(changed, instant) - 1, 0)]

    def changes(self, plan_id: str, start: datetime, end: datetime | None) -> list[datetime]:
        """The instants in ``(start, end)`` at which the plan's fee changed."""
        changed, fees = self._changed.get(plan_id, []), self._fees.get(plan_id, [])
        return [
            at
            for i, at in enumerate(changed)
            if i and start < at and (end is None or at < end) and fees[i] != fees[i - 1]
        ]


async def fee_book(conn: AsyncConnection) -> FeeBook:
    return FeeBook((await subscriptions.plan_book(conn)).versions)


def value(state: State, book: FeeBook, instant: datetime) -> Mrr | None:
    """What a subscription in ``state`` is worth a month at ``instant``."""
    if state.status not in FEE_STATUSES:
        return None
    return book.at(state.plan, instant)


@dataclass(frozen=True, slots=True)
class Point:
    """From ``at`` on, the customer's MRR is ``mrr``."""

    at: datetime
    mrr: Mrr | None


def timeline(states: Sequence[State], book: FeeBook) -> list[Point]:
    """Every change of a customer's MRR, oldest first: from its history (ordered as
    ``subscription_history`` is, by time then sequence) and from new versions of the
    plans it was on.  Several rows at one instant count as the last of them."""
    points: list[Point] = []
    for i, state in enumerate(states):
        end = states[i + 1].at if i + 1 < len(states) else None
        if end is not None and end <= state.at:
            continue  # superseded at the same instant
        for at in [state.at, *book.changes(state.plan, state.at, end)]:
            worth = value(state, book, at)
            if (points[-1].mrr if points else None) != worth:
                points.append(Point(at, worth))
    return points


def at(points: Sequence[Point], instant: datetime) -> Mrr | None:
    """The MRR in effect at ``instant`` (changes at ``instant`` included)."""
    current = None
    for point in points:
        if point.at > instant:
            break
        current = point.mrr
    return current
