"""Request bodies read with a bound: a body larger than a route can use is refused with
413 before it is read whole (from its ``Content-Length``) or as soon as it has arrived
past the bound (a chunked one), whoever sends it — authentication comes after reading.
A body must be what it is read as: JSON, sent as is."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from schemas.problem_types import (
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    UNSUPPORTED_ENCODING,
    UNSUPPORTED_MEDIA_TYPE,
)
from services.common.problems import Problem

JSON_TYPES = ("application/json", "text/json")
BODY_SECONDS = 60.0
"""How long a body may take to arrive once reading it began: 10 MiB at under 2 Mbit/s.
uvicorn bounds the wait between requests, not within one, so without it a client that
stops mid-body (by accident, or to hold connections open) would be waited for forever."""


def is_json(content_type: str | None) -> bool:
    """A JSON media type: ``application/json``, ``text/json`` or any ``…+json``."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind in JSON_TYPES or kind.endswith("+json")


async def bounded(request: Request, limit: int) -> bytes:
    """The JSON body as sent, which must be sent as is: a body of a few hundred bytes
    gains nothing from compression, and one read as JSON while encoded would be a
    puzzling error (ingest's bodies, large, may be gzipped: it reads them itself).  A
    body without a ``Content-Type`` is taken as JSON, as FastAPI's own routes take it;
    one declared as something else (a form, text) is refused rather than read as JSON."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise Problem(
            UNSUPPORTED_ENCODING, f"Content-Encoding {encoding!r} is not accepted; send none"
        )
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json(content_type):
        raise Problem(
            UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type!r} is not accepted; send application/json",
        )
    check_declared(request, limit)
    body = bytearray()
    async with arriving(BODY_SECONDS):
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(len(body), limit)
    return bytes(body)


class arriving:  # lower case, as contextlib.suppress: used as ``async with arriving(s):``
    """A body read within ``seconds``, or 408 ``request-timeout``: one timer for the
    whole read, not one per chunk (a chunk a minute would otherwise keep it open).

    A timer and a flag rather than ``asyncio.timeout``: this runs for every decision
    Tally makes over HTTP, and under uvloop ``asyncio.timeout`` costs 6 to 9 µs a use,
    this about 3.  The timer can only fire while the read awaits the client (the code
    between its awaits is synchronous), so its cancel lands inside the read."""

    __slots__ = ("_expired", "_seconds", "_task", "_timer")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._expired = False

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expire)

    def _expire(self) -> None:
        self._expired = True
        if self._task is not None:
            self._task.cancel()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: object
    ) -> None:
        self._timer.cancel()
        if self._expired and kind is asyncio.CancelledError and self._task is not None:
            self._task.uncancel()
            raise Problem(
                REQUEST_TIMEOUT,
                f"the body had not all arrived {self._seconds:g} s after reading began",
            ) from None


def check_declared(request: Request, limit: int) -> None:
    """Refuse a body whose ``Content-Length`` is past ``limit``, before reading any."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)


def too_large(size: int, limit: int) -> Problem:
    return Problem(
        PAYLOAD_TOO_LARGE, f"the body is {size} bytes or more; the limit is {limit} bytes"
    )
