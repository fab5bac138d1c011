"""Errors the SDK raises.

Tally answers every error with RFC 9457 ``application/problem+json``; each error keeps
that body in ``problem`` so callers can act on ``type`` and ``errors`` without parsing
messages.  Refusals by a limit (429) or an inactive account (403) are not errors: they
come back as a ``Decision``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Request(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def url(self) -> Any: ...


class Response(Protocol):
    """What the helpers below read of an HTTP response: an ``httpx.Response`` fits, and
    so does any client's with these members (the SDK itself depends on no HTTP client's
    models: its own pipelined client reads answers directly)."""

    @property
    def status_code(self) -> int: ...

    @property
    def reason_phrase(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def request(self) -> Request: ...

    def json(self) -> Any: ...


class TallyError(Exception):
    """Anything that went wrong talking to Tally; ``status`` is ``None`` without a response."""

    def __init__(
        self, message: str, *, status: int | None = None, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem


class AuthenticationError(TallyError):
    """401: the key or token is missing, malformed, unknown, revoked or expired."""


class InvalidRequest(TallyError):
    """400/422: the request itself is wrong (unknown meter, bad quantity…); retrying won't help."""


class ServerError(TallyError):
    """5xx: Tally could not decide or store; usually worth retrying later."""


class Unavailable(TallyError):
    """No answer at all: connection refused or dropped, timeout, DNS.  Wraps the cause."""


class BufferFull(TallyError):
    """``emit`` found the buffer full: Tally has been unreachable for a while or events arrive
    faster than they can be sent.  Raised rather than dropping silently, so the caller
    decides what an unmetered event costs them (use ``overflow="drop_oldest"`` to drop)."""


class ClientClosed(TallyError):
    """The client was closed; events emitted now would never be sent."""


def problem_of(response: Response) -> dict[str, Any] | None:
    """The JSON object of the body, if there is one: problem+json or any JSON error body."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def error_for(response: Response) -> TallyError:
    """The typed error for an unsuccessful answer, carrying its problem body."""
    what = f"{response.request.method} {response.request.url.path}"
    return error_of(response.status_code, problem_of(response), what, response.reason_phrase)


def error_of(status: int, problem: dict[str, Any] | None, what: str, reason: str) -> TallyError:
    """The typed error for an unsuccessful answer to ``what`` (method and path)."""
    detail = (problem or {}).get("detail") or reason or "no detail"
    message = f"{what} → {status}: {detail}"
    kind: type[TallyError] = TallyError
    if status == 401:
        kind = AuthenticationError
    elif status in (400, 422):
        kind = InvalidRequest
    elif status >= 500:
        kind = ServerError
    return kind(message, status=status, problem=problem)


def unavailable(exc: Exception, url: str) -> Unavailable:
    return Unavailable(f"Tally at {url} did not answer: {exc!r}")
