"""Numbers, money and dates as the dashboard prints them, on the server: the page reads
the same with or without JavaScript, and money never passes through a float."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

WARN_PERCENT = Decimal(70)
OVER_PERCENT = Decimal(90)


def number(value: Decimal | int) -> str:
    """``1234567.5`` → ``1,234,567.5``: grouped, no trailing zeros, never exponent form."""
    amount = Decimal(value)
    if amount == amount.to_integral_value():
        return f"{amount.quantize(Decimal(1)):,}"
    return f"{amount.normalize():,f}"


def estimate(value: Decimal) -> str:
    """A forecast quantity, to two decimals: its precision is the pace's, not the digits'."""
    return number(value.quantize(Decimal("0.01"), ROUND_HALF_UP))


def money(amount: Decimal, currency: str) -> str:
    """An amount as billing rounded it (its minor unit kept: ``10.00``), with its currency."""
    return f"{amount:,} {currency.upper()}"


def percent(used: Decimal, limit: Decimal) -> Decimal:
    """How much of ``limit`` is used, in percent (a zero limit used at all is 100 %)."""
    if limit <= 0:
        return Decimal(100) if used > 0 else Decimal(0)
    return used * 100 / limit


def level(share: Decimal) -> str:
    """The bar's class: ``warn`` from 70 %, ``over`` from 90 % (tally.css colours them)."""
    if share >= OVER_PERCENT:
        return "over"
    if share >= WARN_PERCENT:
        return "warn"
    return ""


def width(share: Decimal) -> int:
    """The bar's filled width, whole percent from 0 to 100 (a class in portal.css: the
    page's policy allows no inline style)."""
    return max(0, min(100, int(share)))


def day(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d}"


def instant(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


WINDOWS = {1: "second", 60: "minute", 3600: "hour", 86_400: "day"}


def per(seconds: int) -> str:
    """A rate limit's window in words: ``minute``, or ``90 s`` for an uncommon one."""
    return WINDOWS.get(seconds) or f"{number(seconds)} s"
