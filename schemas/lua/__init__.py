"""The Redis Lua scripts, kept as files beside the key layout they use (``schemas.redis_keys``).

Each script is shared by whichever service runs it; loading by name keeps the text in one
place, readable and diffable as Lua rather than as Python strings.
"""

from __future__ import annotations

import re
from importlib import resources


def source(name: str, **constants: str) -> str:
    """The text of ``schemas/lua/{name}.lua``, each ``@NAME@`` replaced by ``constants[NAME]``
    (constants the Python side defines too, such as hash field names)."""
    text = resources.files(__package__).joinpath(f"{name}.lua").read_text()
    for placeholder, value in constants.items():
        text = text.replace(f"@{placeholder}@", value)
    if missing := re.findall(r"@[A-Z_]+@", text):
        raise ValueError(f"{name}.lua: no value given for {', '.join(sorted(set(missing)))}")
    return text
