"""Alert thresholds as the aggregator's batch call reads them, and the crossings it writes.

Billing compiles a customer's alert rules (the plan's defaults and the customer's own)
into, per meter, the sorted distinct usage levels in micro-units at which something
fires, each with a short label naming what it is (kind, configured value, rule, the
limit a percentage refers to, the currency of a spend).  ``apply_batch.lua`` walks these
lines with one pattern match and copies the label of the highest level crossed into the
crossing it pushes; the aggregator turns crossings into ``alert.triggered``
notifications.  Labels carry no spaces, so a line splits on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

SPEND_FIELD = "*spend"
"""The field of a customer's compiled alerts hash present while it has whole-invoice spend
rules (no meter name starts with ``*``): the batch call then marks the customer for
billing to evaluate whenever it changes a month total."""

PLAN_RULE = "plan"
"""The ``rule`` of a plan's default alert (customer rules carry their id)."""


class AlertKind(StrEnum):
    PERCENT = "percent"  # of the quota, else of the included units
    USAGE = "usage"  # absolute, in the meter's unit
    SPEND = "spend"  # money: the period's invoice to date for the meter


@dataclass(frozen=True, slots=True)
class Threshold:
    """One usage level that fires, and what to say when it does."""

    quantity: int  # micro-units of the meter: fires when the month total reaches it
    kind: AlertKind
    value: Decimal  # as configured: 80 (%), 900 (units), 50.00 (money)
    rule: str  # PLAN_RULE or the customer rule's id
    limit: Decimal | None = None  # the quota or included units a percentage refers to
    currency: str | None = None  # a spend's

    @property
    def label(self) -> str:
        parts = (self.kind.value, str(self.value), self.rule, _opt(self.limit), self.currency)
        return ",".join(p or "" for p in parts)


@dataclass(frozen=True, slots=True)
class Crossing:
    """A threshold the month total reached: popped from ``redis_keys.alerts_out``."""

    meter: str
    month: str  # yyyymm, the UTC calendar month (the quota period)
    total: int  # micro-units when it fired
    threshold: Threshold


def encode(thresholds: Iterable[Threshold]) -> str:
    """One meter's hash value: the lowest label wins a tie of equal quantities (callers
    pass plan defaults first), so each level is listed once."""
    by_quantity: dict[int, Threshold] = {}
    for threshold in thresholds:
        by_quantity.setdefault(threshold.quantity, threshold)
    return "\n".join(f"{q} {by_quantity[q].label}" for q in sorted(by_quantity))


def decode(value: str) -> list[Threshold]:
    """The inverse of ``encode`` (for reading back what is compiled)."""
    lines = (line.split(" ") for line in value.split("\n") if line)
    return [_threshold(int(q), label) for q, label in lines]


def parse_crossing(raw: str) -> Crossing:
    meter, month, quantity, total, label = raw.split(" ")
    return Crossing(meter, month, int(total), _threshold(int(quantity), label))


def _threshold(quantity: int, label: str) -> Threshold:
    kind, value, rule, limit, currency = label.split(",")
    return Threshold(
        quantity=quantity,
        kind=AlertKind(kind),
        value=Decimal(value),
        rule=rule,
        limit=Decimal(limit) if limit else None,
        currency=currency or None,
    )


def _opt(value: Decimal | None) -> str:
    return "" if value is None else str(value)
