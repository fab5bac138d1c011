"""How the customer dashboard prints numbers and picks a bar's colour, and which
frame-ancestors setting it refuses."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from services.api.portal.figures import estimate, level, money, number, per, percent, width
from services.common.settings import Settings


def test_numbers_are_grouped_and_never_in_exponent_form() -> None:
    assert number(Decimal("1234567")) == "1,234,567"
    assert number(Decimal("1E+3")) == "1,000"
    assert number(Decimal("1234.5000")) == "1,234.5"
    assert number(Decimal("0.000001")) == "0.000001"
    assert number(0) == "0"
    assert estimate(Decimal("22960.065910972221")) == "22,960.07"
    assert money(Decimal("1234.50"), "usd") == "1,234.50 USD"  # billing's rounding kept
    assert money(Decimal("0"), "jpy") == "0 JPY"
    assert (per(60), per(86_400), per(90)) == ("minute", "day", "90 s")


@pytest.mark.parametrize(
    ("used", "limit", "colour", "filled"),
    [
        ("0", "100", "", 0),
        ("69.99", "100", "", 69),
        ("70", "100", "warn", 70),
        ("89.9", "100", "warn", 89),
        ("90", "100", "over", 90),
        ("250", "100", "over", 100),  # a soft quota overrun: the bar is full, not wider
        ("1", "0", "over", 100),  # nothing allowed, something used
        ("0", "0", "", 0),
    ],
)
def test_a_bar_is_amber_from_70_and_red_from_90(
    used: str, limit: str, colour: str, filled: int
) -> None:
    share = percent(Decimal(used), Decimal(limit))
    assert (level(share), width(share)) == (colour, filled)


@pytest.mark.parametrize("bad", ["", "'self'; script-src *", "https://a.example,https://b", "a\nb"])
def test_frame_ancestors_take_sources_only(bad: str) -> None:
    with pytest.raises(ValidationError, match="TALLY_PORTAL_FRAME_ANCESTORS"):
        Settings(portal_frame_ancestors=bad)
    assert Settings(portal_frame_ancestors="'self' https://app.example.com")
