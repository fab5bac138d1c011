"""Enforcement: may this customer make this call now?

The decision is one Redis Lua call (``schemas/lua/enforce.lua``, driven by ``limiter``) over
a pipelined connection; ``refusals`` tells it as headers and problem+json, ``fallback``
decides when Redis cannot be reached.  ``status`` reads every limit's state without
spending any (``schemas/lua/limits.lua``) for ``GET /v1/customers/{c}/limits``.
``leases`` (``schemas/lua/lease.lua``, driven by ``leaser``) grants an app process a
share of the limits to decide locally.
"""
