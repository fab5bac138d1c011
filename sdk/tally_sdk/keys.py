"""The caller's API key, as a request's headers carry it.

``Authorization: Bearer <key>`` or, failing that, ``X-API-Key: <key>`` (the first of
each).  The middleware reads it for every request, and a busy API sees the same few
keys over and over, so ``Keys`` remembers what each pair of raw header values meant:
a request then costs a scan of its headers and one dict lookup instead of decoding,
splitting and stripping text (half the time, measured in ``docs/benchmarks.md``).
"""

from __future__ import annotations

from tally_sdk.asgi import Scope

MAX_REMEMBERED = 10_000
"""Pairs of header values remembered; reaching it forgets them all and starts again, so
callers sending a new key per request (a scan) cost no more than parsing each."""
MAX_RAW = 512
"""Longer header values are parsed but not remembered: a caller's megabyte header must
not stay in the app's memory.  Tally's keys are 61 characters."""
_BYTES = (bytes, bytearray, memoryview)
"""What a header value may be read from.  A ``memoryview`` (not ASGI, but bytes-like)
counts too: it hashes and compares equal to its bytes, so ``Keys`` would find a pair
remembered from bytes for it, and must mean the same as parsing it."""


def api_key(scope: Scope) -> str | None:
    """The caller's key, parsed afresh (``Keys`` remembers)."""
    return key_of(*key_headers(scope))


def key_headers(scope: Scope) -> tuple[object, object]:
    """The raw values of the first ``Authorization`` and ``X-API-Key`` headers.

    Names compare equal whether ``bytes`` or ``bytearray`` (what ASGI allows); a name of
    another type (``str``, not ASGI) matches neither and is ignored."""
    authorization = x_api_key = None
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            if authorization is None:
                authorization = value
        elif name == b"x-api-key" and x_api_key is None:
            x_api_key = value
    return authorization, x_api_key


def key_of(authorization: object, x_api_key: object) -> str | None:
    """The key the two header values give: a Bearer token, else the X-API-Key value.
    A value that is not bytes (a ``str`` in a scope built by hand) is ignored like a
    missing header rather than failing the request."""
    if isinstance(authorization, _BYTES):
        scheme, _, token = bytes(authorization).decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if isinstance(x_api_key, _BYTES):
        return bytes(x_api_key).decode("latin-1").strip() or None
    return None


class Keys:
    """``api_key`` with what each pair of header values meant remembered."""

    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self._max = max_remembered
        self._known: dict[tuple[object, object], str | None] = {}

    def read(self, scope: Scope) -> str | None:
        raw = key_headers(scope)
        try:
            return self._known[raw]
        except KeyError:
            key = key_of(*raw)
        except (TypeError, ValueError):  # a bytearray (or a view of one) cannot be a
            # dict key: parsed every time
            return key_of(*raw)
        if all(value is None or (type(value) is bytes and len(value) <= MAX_RAW) for value in raw):
            if len(self._known) >= self._max:
                self._known = {}
            self._known[raw] = key
        return key
