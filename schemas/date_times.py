"""One rule for the times a client writes: RFC 3339 text.

pydantic's lax datetime also reads a number, or a string of digits, as seconds or
milliseconds since 1970, guessing which by its size.  An event's time, the range a usage
read covers or the moment a key expires must not rest on that guess: where a client sends
a time, it is RFC 3339 (``2026-11-01T00:00:00Z``, as CloudEvents' ``time`` is), and
anything else is refused, naming the field.  The check runs for every event ingested, so
text, the common case, is tested first and by its shape alone (0.3 µs an event).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BeforeValidator

EXAMPLE = "2026-11-01T00:00:00Z"
NOT_RFC3339 = f"must be an RFC 3339 date-time, e.g. {EXAMPLE}"
_SEPARATORS = ("T", "t", " ")
"""Between an RFC 3339 date and its time: a date-time is ``YYYY-MM-DD`` then one of these,
where seconds since 1970 (digits) or a bare date have none; pydantic reads the rest,
offset included, and refuses what is not a date-time in its own words."""


def rfc3339(given: object) -> object:
    """``given`` as it came if pydantic may read it as a date-time: text shaped as RFC
    3339, a ``datetime`` already made, or ``None``; else ``ValueError``."""
    if isinstance(given, str):
        if given[4:5] == "-" and given[10:11] in _SEPARATORS:
            return given
    elif given is None or isinstance(given, datetime):
        return given
    raise ValueError(NOT_RFC3339)


RFC3339 = BeforeValidator(rfc3339)
"""For ``Annotated[datetime | None, RFC3339]``: the rule above, before pydantic's own."""
