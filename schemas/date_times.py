"""One rule for the times a client writes: RFC 3339 text.

pydantic's lax datetime also reads a number, or a string of digits, as seconds or
milliseconds since 1970, guessing which by its size.  The range a usage read covers or
the moment a key expires must not rest on that guess: where a client sends a time, it is
RFC 3339 (``2026-11-01T00:00:00Z``), and anything else is refused, naming the field.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BeforeValidator

EXAMPLE = "2026-11-01T00:00:00Z"
_START = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]")
"""How an RFC 3339 date-time starts; pydantic reads the rest, offset included."""


def rfc3339(given: object) -> object:
    """``given`` as it came if pydantic may read it as a date-time: text shaped as RFC
    3339, a ``datetime`` already made, or ``None``; else ``ValueError``."""
    if given is None or isinstance(given, datetime):
        return given
    if isinstance(given, str) and _START.match(given):
        return given
    raise ValueError(f"must be an RFC 3339 date-time, e.g. {EXAMPLE}")


RFC3339 = BeforeValidator(rfc3339)
"""For ``Annotated[datetime | None, RFC3339]``: the rule above, before pydantic's own."""
