"""A number in event data reads as the same text live and in ClickHouse.

Groups, filters and unique members of numbers are text: the live counters make it with
``paths.number_text``, the rollups' SQL with ClickHouse's ``JSONExtractRaw``.  Any
number ingest keeps — random doubles written in their shortest form, the same written
with trailing zeros or an exponent, 64-bit integers — must read the same in both.
"""

from __future__ import annotations

from decimal import Decimal

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import paths
from services.common.clickhouse import ClickHouse


def _literals(number: float) -> list[str]:
    """``number`` as JSON texts a client may send: shortest, padded, exponent form."""
    shortest = orjson.dumps(number).decode()
    exact = Decimal(repr(number))
    return [shortest, f"{exact:E}", f"{exact:f}0" if "." in f"{exact:f}" else f"{exact:f}.0"]


def _clickhouse_texts(ch: ClickHouse, literals: list[str]) -> list[str]:
    rows = ch.query(
        "SELECT JSONExtractRaw(concat('{\"k\":', arrayJoin({n:Array(String)}), '}'), 'k')",
        {"n": literals},
    )
    return [row[0] for row in rows]


def _live_texts(literals: list[str]) -> list[str | None]:
    return [paths.as_dimension(orjson.loads(literal)) for literal in literals]  # ints


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20))
def test_doubles_read_the_same_text_live_and_in_clickhouse(
    ch: ClickHouse, numbers: list[float]
) -> None:
    literals = [text for number in numbers for text in _literals(number)]
    live = [paths.number_text(Decimal(literal)) for literal in literals]
    assert live == _clickhouse_texts(ch, literals)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(*paths.INTEGERS).filter(lambda n: n < paths.INTEGERS[1]), min_size=1))
def test_64_bit_integers_read_the_same_text_live_and_in_clickhouse(
    ch: ClickHouse, numbers: list[int]
) -> None:
    literals = [str(number) for number in numbers]
    assert _live_texts(literals) == _clickhouse_texts(ch, literals)


def test_known_forms_of_one_number_read_as_one_text(ch: ClickHouse) -> None:
    literals = ["1.50", "15E-1", "1.5", "100.0", "1E+3", "-0.0", "1e-7", "1e21", "1e20"]
    expected = ["1.5", "1.5", "1.5", "100", "1000", "-0", "1e-7", "1e21", "100000000000000000000"]
    assert [paths.number_text(Decimal(literal)) for literal in literals] == expected
    assert _clickhouse_texts(ch, literals) == expected
