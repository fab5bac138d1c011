"""The few ASGI pieces the middleware needs, written out so that the SDK works with any
ASGI framework without importing one."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBLEM_JSON = "application/problem+json"


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header; ``name`` in lower case, as ASGI gives it."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def encoded(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_problem(
    scope: Scope, send: Send, status: int, problem: Mapping[str, Any], headers: Mapping[str, str]
) -> None:
    """A complete ``application/problem+json`` response about this request.

    ``instance`` is set to the request's path: a problem relayed from Tally names
    Tally's own ``/v1/enforce``, which means nothing to the caller.
    """
    occurrence = {**problem, "status": status, "instance": scope["path"]}
    body = json.dumps(occurrence, separators=(",", ":")).encode()
    start = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *encoded(headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})
