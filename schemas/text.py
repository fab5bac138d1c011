"""One rule for the text Tally keeps: no control characters.

Ids, subjects, sources, dimensions and customer ids are stored (PostgreSQL refuses a NUL
in ``text`` outright, ClickHouse and Redis keep whatever they are given), printed in
logs and pages, and sent on to Stripe and to webhook receivers.  A control character in
them is a client bug or an attack (log forging with ``\\n``, terminal escapes with
``\\x1b``, truncation at ``\\x00`` in C libraries), never part of a real name.  So
every such field refuses the C0 controls (U+0000-U+001F), DEL (U+007F) and the C1
controls (U+0080-U+009F: no text means them, and terminals execute some, such as CSI
U+009B, as escapes just like C0's ESC) with a 422 naming the field and the character.

The rule is a pattern (``PRINTABLE_PATTERN``) so that pydantic-core checks it without a
call into Python (ingest validates tens of thousands of events a second) and the JSON
Schema documents it; ids with a pattern of their own (customers, event types) already
exclude control characters.  ``reason`` turns the pattern's failure into a sentence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

CONTROL_CHARACTERS = "U+0000-U+001F, U+007F-U+009F"
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
"""What a field without a pattern of its own is constrained to."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def control_character(value: str) -> str | None:
    """Why ``value`` is refused, if it holds a control character."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    return (
        f"must not contain control characters ({CONTROL_CHARACTERS});"
        f" found U+{ord(found.group()):04X} at position {found.start()}"
    )


def reason(error: Mapping[str, Any]) -> str:
    """The reason to give for one of pydantic's errors: a pattern that refused a string
    for its control character says so, rather than quoting the pattern."""
    value = error.get("input")
    if error.get("type") == "string_pattern_mismatch" and isinstance(value, str):
        found = control_character(value)
        if found:
            return found
    return str(error["msg"]).removeprefix("Value error, ")
