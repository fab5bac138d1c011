"""How numbers, money and times read in an email: exact decimals, the currency's own
minor unit, UTC spelled out.

Payload values arrive as JSON strings ("800", "12.50", RFC 3339 times); every filter
takes those or the parsed value, and never goes through a float.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any

from services.billing.rating.money import exponent, round_line

SYMBOLS = {"usd": "$"}
"""Currencies written with a symbol in front; the rest read "12.50 EUR".  Only the
dollar: "$" alone is read as US dollars, and other symbols are ambiguous in plain text."""


def decimal(value: object) -> Decimal:
    """A payload number (a string, int or Decimal) as a Decimal; ``ValueError`` if it is
    none (floats are refused: they are not exact)."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"not a decimal number: {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"not a decimal number: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return number


def quantity(value: object, unit: str | None = None) -> str:
    """1000 -> "1,000"; 12.50 -> "12.5"; with a unit: "1,000 GB"."""
    number = decimal(value)
    text = format(number.normalize() if number == number.to_integral() else number, ",f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {unit}" if unit else text


def money(value: object, currency: str) -> str:
    """An amount in its currency's minor unit: "$1,370.00", "12.50 EUR", "1,200 JPY"."""
    amount = round_line(decimal(value), currency)
    digits = format(abs(amount), f",.{exponent(currency)}f")
    sign = "-" if amount < 0 else ""
    symbol = SYMBOLS.get(currency.lower())
    return f"{sign}{symbol}{digits}" if symbol else f"{sign}{digits} {currency.upper()}"


def excess(value: object, limit: object) -> str:
    """How far ``value`` goes past ``limit`` (0 when it does not), as a quantity."""
    return quantity(max(decimal(value) - decimal(limit), Decimal(0)))


def percent(part: object, whole: object) -> str:
    """``part`` as a share of ``whole``, rounded down so 99.9 % never reads "100 %"."""
    total = decimal(whole)
    if total == 0:
        return "100 %"
    share = (decimal(part) * 100 / total).quantize(Decimal(1), rounding=ROUND_DOWN)
    return f"{share:,f} %"


def instant(value: object) -> datetime:
    """A payload time (RFC 3339 string or an aware datetime) in UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    else:
        raise ValueError(f"not a time: {value!r}")
    if moment.tzinfo is None:
        raise ValueError(f"a time without a time zone: {value!r}")
    return moment.astimezone(UTC)


def when(value: object) -> str:
    """ "Thursday 3 December 2026, 14:05 UTC"."""
    moment = instant(value)
    return f"{moment:%A} {moment.day} {moment:%B %Y, %H:%M} UTC"


def day(value: object) -> str:
    """ "3 December 2026"."""
    moment = instant(value)
    return f"{moment.day} {moment:%B %Y}"


def period(value: Any) -> str:
    """A quota period ``{start, end}`` (end exclusive): "December 2026" for a calendar
    month, else "3 December 2026 to 2 January 2027" (the last day included)."""
    start, end = instant(value["start"]), instant(value["end"])
    month_end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    if (
        start == start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        and end == month_end
    ):
        return f"{start:%B %Y}"
    return f"{day(start)} to {day(end - timedelta(microseconds=1))}"


FILTERS: dict[str, Callable[..., str]] = {
    "quantity": quantity,
    "money": money,
    "percent": percent,
    "excess": excess,
    "when": when,
    "day": day,
    "period": period,
}
