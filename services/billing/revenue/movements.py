"""MRR movements per calendar month, as ChartMogul defines them.

Every change of a customer's MRR is one movement, by what it was before and after:

- **new**: from nothing to something, for a customer never paying in that currency
  before (a trial converting is new in the month it converts);
- **reactivation**: from nothing to something, for a customer who paid before;
- **expansion** / **contraction**: from something to more / less;
- **churn**: from something to nothing (cancelled or suspended; Tally subscriptions are
  one per customer, so that is always the last one).

A month's movements are the changes at instants in ``[start, end)``; its starting MRR
is the MRR in effect just before ``start``, its ending MRR just before ``end``.  Each
change is counted once and whole, so ``ending = starting + new + expansion +
reactivation - contraction - churn`` holds exactly, per currency.  A change from one
currency to another is churn (or contraction) in the one and new (or reactivation) in
the other: amounts in two currencies are never added up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from services.billing.revenue.mrr import Mrr, Point


class Movement(StrEnum):
    NEW = "new"
    EXPANSION = "expansion"
    CONTRACTION = "contraction"
    CHURN = "churn"
    REACTIVATION = "reactivation"


def classify(before: Decimal, after: Decimal, paid_before: bool) -> tuple[Movement, Decimal]:
    """One change of one customer's MRR in one currency: its kind and (positive) size."""
    if not before:
        return (Movement.REACTIVATION if paid_before else Movement.NEW), after
    if not after:
        return Movement.CHURN, before
    if after > before:
        return Movement.EXPANSION, after - before
    return Movement.CONTRACTION, before - after


T = TypeVar("T")


def _zeros(zero: T) -> dict[Movement, T]:
    return dict.fromkeys(Movement, zero)


@dataclass(slots=True)
class MonthFlow:
    """One currency's MRR over one month: where it started, how it moved, where it ended."""

    starting: Decimal = Decimal(0)
    ending: Decimal = Decimal(0)
    moved: dict[Movement, Decimal] = field(default_factory=lambda: _zeros(Decimal(0)))
    customers: dict[Movement, int] = field(default_factory=lambda: _zeros(0))

    def add(self, movement: Movement, amount: Decimal) -> None:
        self.moved[movement] += amount
        self.customers[movement] += 1

    def balances(self) -> bool:
        """The identity, which holds by construction (the property tests check it)."""
        m = self.moved
        grown = m[Movement.NEW] + m[Movement.EXPANSION] + m[Movement.REACTIVATION]
        return self.ending == self.starting + grown - m[Movement.CONTRACTION] - m[Movement.CHURN]


ZERO = Decimal(0)
Month = tuple[datetime, datetime]  # [start, end)
Flows = dict[str, list[MonthFlow]]  # currency -> one flow per month


def _amount(mrr: Mrr | None, currency: str) -> Decimal:
    return mrr.amount if mrr is not None and mrr.currency == currency else ZERO


class _Walk:
    """One customer's timeline, walked forward once across the months."""

    def __init__(self, points: Sequence[Point], flows: Flows, months: int) -> None:
        self._points, self._flows, self._months = points, flows, months
        self._next = 0
        self.current: Mrr | None = None
        self._paid: set[str] = set()

    def _flow(self, currency: str, month: int) -> MonthFlow:
        if currency not in self._flows:
            self._flows[currency] = [MonthFlow() for _ in range(self._months)]
        return self._flows[currency][month]

    def until(self, instant: datetime, month: int | None) -> None:
        """Apply the changes before ``instant``, recording them in ``month`` if given."""
        while self._next < len(self._points) and self._points[self._next].at < instant:
            after = self._points[self._next].mrr
            for currency in {m.currency for m in (self.current, after) if m is not None}:
                old, new = _amount(self.current, currency), _amount(after, currency)
                if old != new and month is not None:
                    self._flow(currency, month).add(*classify(old, new, currency in self._paid))
                if new:
                    self._paid.add(currency)
            self.current = after
            self._next += 1

    def balance(self, month: int, *, ending: bool) -> None:
        if self.current is None:
            return
        flow = self._flow(self.current.currency, month)
        if ending:
            flow.ending += self.current.amount
        else:
            flow.starting += self.current.amount


def monthly(
    timelines: Iterable[Sequence[Point]], months: Sequence[Month], flows: Flows | None = None
) -> Flows:
    """Each currency's flows over consecutive ``months``, from every customer's timeline
    (added to ``flows``, when given: customers come a page at a time)."""
    flows = {} if flows is None else flows
    for points in timelines:
        walk = _Walk(points, flows, len(months))
        for index, (start, end) in enumerate(months):
            walk.until(start, None)
            walk.balance(index, ending=False)
            walk.until(end, index)
            walk.balance(index, ending=True)
    return flows
