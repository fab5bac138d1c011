"""How quantities and money travel in a notification's ``data``: decimal strings."""

from __future__ import annotations

from decimal import Decimal

from schemas.notifications import moment
from services.billing.invoicing.periods import Period

UNITS = Decimal("0.000001")  # usage has at most six decimals


def units(quantity: Decimal) -> str:
    """A quantity as a plain decimal string, to the micro-unit (``"89855.172414"``)."""
    return _plain(quantity.quantize(UNITS))


def money(amount: Decimal) -> str:
    """An amount already rounded to its minor unit, as a string (``"12.50"``)."""
    return format(amount, "f")


def period(span: Period) -> dict[str, str]:
    return {"start": moment(span.start), "end": moment(span.end)}


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
