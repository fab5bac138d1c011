"""Currencies' minor units and the one rounding rule every invoice line follows.

Rounding happens exactly once per line, half up, to the currency's minor unit (cents for
usd, whole yen for jpy, fils for kwd); everything before it is exact decimal arithmetic
in a context wide enough that no product of a quantity and a price is ever rounded.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal

# ISO 4217 exponents that are not 2.  Stripe calls the 0 ones "zero-decimal currencies".
_ZERO_DECIMAL = "bif clp djf gnf isk jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf"
_THREE_DECIMAL = "bhd iqd jod kwd lyd omr tnd"
_EXPONENTS = {c: 0 for c in _ZERO_DECIMAL.split()} | {c: 3 for c in _THREE_DECIMAL.split()}

# 18-digit quantities times 8-decimal prices need 36 digits; leave room for sums.
EXACT = Context(prec=60)


def exponent(currency: str) -> int:
    """Digits after the decimal point in the currency's minor unit."""
    return _EXPONENTS.get(currency.lower(), 2)


def round_line(amount: Decimal, currency: str) -> Decimal:
    """An exact amount rounded to the currency's minor unit, half up."""
    return amount.quantize(Decimal(1).scaleb(-exponent(currency)), rounding=ROUND_HALF_UP)


def minor_units(amount: Decimal, currency: str) -> int:
    """A rounded amount in the currency's minor unit (what Stripe calls ``unit_amount``)."""
    return int(round_line(amount, currency).scaleb(exponent(currency)))


def minor_decimal(amount: Decimal, currency: str) -> str:
    """An exact amount in the currency's minor unit, unrounded, as Stripe's
    ``*_decimal`` fields take it (0.0005 usd is "0.05" cents)."""
    return format(amount.scaleb(exponent(currency)).normalize(), "f")
