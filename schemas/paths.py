"""Paths into an event's ``data``: how a meter names the value it aggregates and the
dimensions it groups and filters by.

The grammar is the small, safe part of JSONPath every metering peer understands
(OpenMeter's ``$.tokens.input``): ``$`` followed by ``.name`` and ``[index]`` steps, at
most ``MAX_STEPS`` of them.  A bare name (``model``, ``tokens.input``) is the same path
without the ``$.``: the catalogs written before nested data (``value_property: user``,
``group_by: [endpoint]``) keep their meaning.  No wildcards, filters or recursive descent:
a meter must name exactly one value per event, so that live counters, rollups and
ClickHouse SQL all extract the same thing.

A path's *name* is its canonical text without ``$.`` (``$.model`` → ``model``): the key
under which the usage API reports a group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Final

MAX_STEPS = 8
MAX_PATH_LENGTH = 256
_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_STEP = re.compile(rf"\.({_NAME})|\[(0|[1-9][0-9]{{0,5}})\]")
_FIRST = re.compile(_NAME)
NUMERIC_STRING = r"^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$"
"""A string a meter reads as a number: plain decimal digits, as JSON writes numbers (no
spaces, no ``+``, no ``.5``), so that ClickHouse's SQL reads exactly the same ones."""
_NUMERIC = re.compile(NUMERIC_STRING)


class _Missing:
    """What a path finds where the event has nothing: distinct from JSON ``null``."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()
Step = str | int


@dataclass(frozen=True, slots=True)
class DataPath:
    """A parsed path: its steps (names and array indexes) and its canonical name."""

    steps: tuple[Step, ...]

    @property
    def name(self) -> str:
        """``tokens.input``, ``items[0].id``: how groups are keyed in answers."""
        text = "".join(f".{s}" if isinstance(s, str) else f"[{s}]" for s in self.steps)
        return text.removeprefix(".")

    @property
    def text(self) -> str:
        """The canonical JSONPath: ``$.tokens.input``."""
        return "$." + self.name if isinstance(self.steps[0], str) else "$" + self.name

    @property
    def top_level(self) -> str | None:
        """The key when the path is one top-level name (``endpoint``), else None: such
        paths read what ingest already flattened into dimensions."""
        if len(self.steps) == 1 and isinstance(self.steps[0], str):
            return self.steps[0]
        return None

    def find(self, data: Any) -> Any:
        """The value at this path in ``data``, or ``MISSING``."""
        here = data
        for step in self.steps:
            if isinstance(step, str):
                if not isinstance(here, dict) or step not in here:
                    return MISSING
            elif not isinstance(here, list) or step >= len(here):
                return MISSING
            here = here[step]
        return here


@lru_cache(maxsize=4096)
def parse(text: str) -> DataPath:
    """Parse ``$.a.b[0]`` or ``a.b[0]``; raise ``ValueError`` saying what is wrong."""
    if not text:
        raise ValueError("a path must not be empty")
    if len(text) > MAX_PATH_LENGTH:
        raise ValueError(f"a path is at most {MAX_PATH_LENGTH} characters")
    if text.startswith("$"):
        rest = text[1:]
        if not rest:
            raise ValueError("`$` alone names the whole data object, not one value")
    else:
        first = _FIRST.match(text)
        if first is None:
            raise ValueError(f"{text!r} must start with `$` or a name ({_NAME})")
        rest = "." + text
    steps: list[Step] = []
    at = 0
    while at < len(rest):
        step = _STEP.match(rest, at)
        if step is None:
            raise ValueError(
                f"{text!r} is not a path: expected `.name` or `[index]` at {rest[at:]!r}"
            )
        name, index = step.groups()
        steps.append(name if name is not None else int(index))
        at = step.end()
    if len(steps) > MAX_STEPS:
        raise ValueError(f"a path has at most {MAX_STEPS} steps")
    if isinstance(steps[0], int):
        raise ValueError("data is an object: a path starts with a name, not an index")
    return DataPath(tuple(steps))


def as_decimal(found: Any) -> Decimal | None:
    """A number found at a path, exactly: JSON numbers and numeric strings, not booleans.

    Floats (what a JSON parser makes of ``0.1``) go through their shortest repr, so
    ``0.1`` is ``Decimal('0.1')``, never ``0.1000000000000000055…``.
    """
    if isinstance(found, bool) or found is None or found is MISSING:
        return None
    if isinstance(found, Decimal):
        return found if found.is_finite() else None
    if isinstance(found, int):
        return Decimal(found)
    if isinstance(found, float):
        return Decimal(repr(found)) if found == found and abs(found) != float("inf") else None
    if isinstance(found, str):
        if not _NUMERIC.fullmatch(found):
            return None
        try:
            return Decimal(found)
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            return None
    return None


def as_dimension(found: Any) -> str | None:
    """A scalar found at a path as a dimension value: strings as they are, numbers as
    their text (``200`` → ``"200"``), booleans as ``true``/``false``; objects, arrays,
    null and nothing are no dimension value."""
    if isinstance(found, str):
        return found
    if isinstance(found, bool):
        return "true" if found else "false"
    if isinstance(found, int) or (isinstance(found, Decimal | float) and _finite(found)):
        return number_text(found)
    return None


def _finite(number: Decimal | float) -> bool:
    return number.is_finite() if isinstance(number, Decimal) else math.isfinite(number)


INTEGERS = (-(2**63), 2**64)
"""The integers JSON numbers may hold exactly: ClickHouse (like most JSON parsers) reads
an integer literal as a 64-bit integer, anything else as a 64-bit float."""


def number_text(number: int | Decimal | float) -> str:
    """A JSON number as text, the way ClickHouse's JSON functions write it, so that a
    group or filter reads the same in the live counters and in SQL: integer literals as
    their digits; every other number as the shortest text of its 64-bit float, in plain
    notation from 10^-6 to 10^21 and ``1e21``/``1.5e-7`` beyond (ECMAScript's rule, without
    ``+`` in the exponent).  So ``1.50``, ``1.5`` and ``15E-1`` are all ``1.5``.

    Ingest refuses the numbers this would change (``exact_as_json``)."""
    if isinstance(number, int):
        return str(number)
    value = float(number)
    if value == 0:
        return "-0" if str(value).startswith("-") else "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    text = "".join(map(str, digits))
    assert isinstance(exponent, int)
    point = exponent + len(text)  # the number is 0.<text> times 10^point
    if len(text) <= point <= 21:
        body = text + "0" * (point - len(text))
    elif 0 < point <= 21:
        body = f"{text[:point]}.{text[point:]}"
    elif -6 < point <= 0:
        body = f"0.{'0' * -point}{text}"
    else:
        mantissa = text if len(text) == 1 else f"{text[0]}.{text[1:]}"
        body = f"{mantissa}e{point - 1}"
    return f"-{body}" if sign else body


def exact_as_json(number: int | Decimal) -> str | None:
    """Why a JSON number in ``data`` cannot be kept exactly, or None: an integer beyond 64
    bits, or a decimal with more digits than a 64-bit float holds.  Analytics (ClickHouse)
    would read another number than the live counters; as a JSON string it stays exact."""
    if isinstance(number, int):
        low, high = INTEGERS
        if not low <= number < high:
            return "is beyond 64-bit integers: send it as a string to keep every digit"
        return None
    if Decimal(repr(float(number))) != number:
        return "has more digits than a 64-bit float holds: send it as a string to keep it exact"
    return None
