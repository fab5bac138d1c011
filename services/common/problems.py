"""RFC 9457 problem details: every error Tally answers with has this shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import orjson
import psycopg
import redis.exceptions
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from schemas.problem_types import (
    BAD_REQUEST,
    EMPTY_BATCH,
    HTTP_ERROR,
    INTERNAL_ERROR,
    INVALID_PARAMETER,
    INVALID_REQUEST,
    MALFORMED_BODY,
    MALFORMED_JSON,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    STORE_UNAVAILABLE,
    UNAUTHORIZED,
    UNKNOWN_CUSTOMER,
    ProblemType,
)
from schemas.text import reason
from services.common.clickhouse import ClickHouseUnavailable
from services.common.logging import get_logger

log = get_logger("tally.http")

PROBLEM_JSON = "application/problem+json"
STORE_RETRY_AFTER_SECONDS = 5


WHOLE_BODY = frozenset({MALFORMED_JSON, MALFORMED_BODY, EMPTY_BATCH})
"""Problems with the body as a whole: their ``errors`` name ``body``, as a field's
problem names the field, so a client finds what to fix in one place whatever it was."""


class Problem(Exception):
    """An error to answer with ``application/problem+json``.

    ``kind`` is one of the registered types (``schemas.problem_types``), which give the
    ``type``, ``status`` and ``title``; ``detail`` says what went wrong in this request;
    ``extra`` holds members specific to the type, such as the failing ``errors``.
    """

    def __init__(
        self,
        kind: ProblemType,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status = kind.status
        self.title = kind.title
        self.detail = detail
        self.headers = headers or {}
        if kind in WHOLE_BODY and "errors" not in extra:
            extra["errors"] = [{"field": "body", "reason": detail}]
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.kind.uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        return body | self.extra

    def response(self, instance: str | None = None) -> Response:
        return Response(
            orjson.dumps(self.body(instance), default=str),
            status_code=self.status,
            media_type=PROBLEM_JSON,
            headers=self.headers,
        )


async def problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response(instance=request.url.path)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("data", "value")`` → ``"data.value"``; list indexes as ``[3]``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def invalid_field(field: str, reason: str, kind: ProblemType = INVALID_REQUEST) -> Problem:
    """422 for one field (or, with ``INVALID_PARAMETER``, one query parameter) of a
    request, named in ``errors``."""
    return Problem(kind, f"{field}: {reason}", errors=[{"field": field, "reason": reason}])


def invalid_parameter(name: str, reason: str) -> Problem:
    """422 ``invalid-parameter`` for one query parameter, named ``query.<name>`` in
    ``errors`` as validation names the ones it refuses: a client finds a parameter under
    one name whichever check refused it."""
    return invalid_field(f"query.{name}", reason, INVALID_PARAMETER)


def unauthorized(detail: str) -> Problem:
    return Problem(UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def invalid_request(
    errors: Sequence[Mapping[str, Any]], prefix: str = "", kind: ProblemType = INVALID_REQUEST
) -> Problem:
    """422 naming each failing field of pydantic ``errors`` (``loc`` under ``prefix``);
    a body that is not JSON at all is 400 ``malformed-json``, as ingest answers it."""
    unreadable = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if unreadable is not None:
        cause = (unreadable.get("ctx") or {}).get("error") or unreadable.get("msg", "")
        return Problem(MALFORMED_JSON, f"the request body is not valid JSON: {cause}")
    found = [
        {
            "field": field_path((prefix, *e["loc"]) if prefix else tuple(e["loc"])),
            "reason": reason(e),
        }
        for e in errors
    ]
    fields = ", ".join(e["field"] for e in found)
    return Problem(kind, f"invalid: {fields}", errors=found)


async def request_validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 for bad parameters, as problem+json naming each field."""
    problem = invalid_request(getattr(exc, "errors", list)())
    return problem.response(instance=request.url.path)


STORE_NAMES = {"redis": "Redis", "postgresql": "PostgreSQL", "clickhouse": "ClickHouse"}
# SQLSTATE classes that mean PostgreSQL cannot serve now: connection exceptions,
# insufficient resources (too many connections), operator intervention (shutting down,
# starting up, statement timeout).  Others (a deadlock, a lock not available) are not
# outages.  Client-side failures (refused, timed out, pool exhausted) carry no SQLSTATE.
_PG_UNAVAILABLE = ("08", "53", "57")


def unavailable_store(exc: BaseException) -> str | None:
    """The store ``exc`` says cannot be reached or did not answer in time, if any."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return "redis"
    if isinstance(exc, psycopg.OperationalError) and (
        exc.sqlstate is None or exc.sqlstate.startswith(_PG_UNAVAILABLE)
    ):
        return "postgresql"  # psycopg_pool's PoolTimeout is an OperationalError too
    if isinstance(exc, ClickHouseUnavailable):
        return "clickhouse"
    return None


def store_unavailable(exc: BaseException, path: str) -> Problem | None:
    """503 naming the store ``exc`` reports as down (logged), or ``None`` for another error.

    The detail names the store but not the error, which may carry hosts and ports.
    """
    store = unavailable_store(exc)
    if store is None:
        return None
    log.warning("store unavailable", store=store, path=path, error=repr(exc))
    return Problem(
        STORE_UNAVAILABLE,
        f"{STORE_NAMES[store]} cannot be reached or did not answer in time; retry later",
        headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)},
        store=store,
    )


def internal_error() -> Problem:
    return Problem(INTERNAL_ERROR, "the request failed")


async def store_error_handler(request: Request, exc: Exception) -> Response:
    """Stores' connection and timeout errors, wherever a route meets them, as 503."""
    problem = store_unavailable(exc, request.url.path)
    if problem is None:
        raise exc  # not an outage: the server error handler answers 500
    return problem.response(instance=request.url.path)


_NUL_REFUSED = "cannot contain NUL"  # psycopg's words, before anything is sent


async def data_error_handler(request: Request, exc: Exception) -> Response:
    """A NUL byte that reached PostgreSQL (which cannot store one in text) through a
    field no schema constrains is the client's error, 422, not a 500; every field the
    API documents refuses control characters by name first (``schemas.text``)."""
    if _NUL_REFUSED not in str(exc):
        raise exc  # another data error: the server error handler answers 500
    detail = "a value holds a NUL byte (U+0000), which Tally does not store"
    return Problem(INVALID_REQUEST, detail).response(instance=request.url.path)


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """An unexpected failure: 500 as problem+json (the server still logs the traceback)."""
    return internal_error().response(instance=request.url.path)


def client_gone(path: str) -> Response:
    """The client hung up before its body arrived (a cancelled upload, a timeout on its
    side): there is no one to answer and nothing failed here, so it is logged as that,
    not as a server error with a traceback."""
    log.info("client disconnected before its request was read", path=path)
    return Response(status_code=400)


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    return client_gone(request.url.path)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request, named: str) -> list[str]:
    """Every method some route serves at this path.  Starlette's ``Allow`` (``named``)
    lists only the methods of the first route that matched the path, not those of the
    others at the same path, so each method is tried against the routes (mounted apps
    such as the static files name their own)."""
    given = {m.strip() for m in named.split(",") if m.strip()}
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    found = {
        method
        for method in METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    }
    allowed = found | given
    return [m for m in METHODS if m in allowed] + sorted(allowed - set(METHODS))


def _slash_toggled(request: Request) -> tuple[str, Match] | None:
    """The request's path with its trailing slash dropped (or one added) and how a route
    matches that (``Match.NONE`` when none does): Starlette's own test before it
    redirects, done here because Tally redirects only a GET or HEAD (a page asked for
    as ``/docs/``).  Other methods get a 404 naming the path: a 307 carries no problem,
    a client that does not follow it learns nothing, one that does sends the body twice.
    """
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if (path[len(root) :] if root and path.startswith(root) else path) == "/":
        return None
    other = path.rstrip("/") if path.endswith("/") else path + "/"
    method = "GET" if request.method == "HEAD" else request.method  # HEAD is a GET's
    scope = {**request.scope, "path": other, "method": method}
    found = {r.matches(scope)[0] for r in request.app.router.routes if not isinstance(r, Mount)}
    best = (
        Match.FULL if Match.FULL in found else Match.PARTIAL if found - {Match.NONE} else Match.NONE
    )
    return other, best


def slashes_here(fallback: ASGIApp) -> ASGIApp:
    """``fallback`` — where what no route serves goes (front's forwarder to back, in
    ``tally up``) — once this app has answered a path it serves with a slash too many
    (no path Tally declares ends in one but `/`): sent on, the path would reach a process where no
    route knows it.  Only a path ending in a slash is matched again: every request front
    forwards to back comes through here."""

    async def default(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/"):
            toggled = _slash_toggled(Request(scope))
            if toggled is not None and toggled[1] is not Match.NONE:
                raise HTTPException(404)  # answered by ``http_error_handler``
        await fallback(scope, receive, send)

    return default


def http_problem(request: Request, exc: HTTPException) -> Problem:
    """Starlette's and FastAPI's own errors (no route, wrong method, a body that cannot
    be read) as problem+json: 404 names the path, 405 the methods allowed."""
    status, path, method = exc.status_code, request.url.path, request.method
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    detail = str(exc.detail) if exc.detail and exc.detail != phrase else ""
    headers = dict(exc.headers or {})
    if status == 404:
        toggled = _slash_toggled(request)
        if not detail and toggled is not None and toggled[1] is not Match.NONE:
            detail = f"nothing is served at {path}; it is served at {toggled[0]}"
        return Problem(NOT_FOUND, detail or f"nothing is served at {path}", headers, path=path)
    if status == 405:
        allowed = allowed_methods(request, headers.get("Allow", ""))
        headers["Allow"] = ", ".join(allowed)
        detail = detail or f"{method} is not allowed on {path}; allowed: {headers['Allow']}"
        return Problem(METHOD_NOT_ALLOWED, detail, headers, allowed=allowed)
    if status == 400:
        return Problem(BAD_REQUEST, detail or phrase, headers)
    problem = Problem(HTTP_ERROR, detail or phrase, headers)
    problem.status, problem.title = status, phrase  # the framework's own, as it answered
    return problem


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404 and request.method in ("GET", "HEAD"):
        toggled = _slash_toggled(request)
        if toggled is not None and toggled[1] is Match.FULL:
            return RedirectResponse(str(URL(scope={**request.scope, "path": toggled[0]})))
    return http_problem(request, exc).response(instance=request.url.path)


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on a FastAPI app: every error it answers,
    ours, the framework's and the stores', is problem+json."""
    app.add_exception_handler(Problem, problem_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    for store_error in (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        psycopg.OperationalError,
        ClickHouseUnavailable,
    ):
        app.add_exception_handler(store_error, store_error_handler)
    app.add_exception_handler(psycopg.DataError, data_error_handler)
    app.add_exception_handler(ClientDisconnect, client_gone_handler)
    app.add_exception_handler(Exception, server_error_handler)


def unknown_customer(customer: str) -> Problem:
    return Problem(UNKNOWN_CUSTOMER, f"no customer {customer!r}")
