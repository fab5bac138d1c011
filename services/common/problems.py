"""RFC 9457 problem details: every error Tally answers with has this shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import Response

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://tally.dev/problems/"


class Problem(Exception):
    """An error to answer with ``application/problem+json``.

    ``slug`` names the problem type (``type`` becomes ``TYPE_BASE + slug``); ``extra``
    holds members specific to it, such as the failing ``errors``.
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.slug,
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


def invalid_field(field: str, reason: str, what: str = "request") -> Problem:
    """422 for one field (or parameter) of a request, named in ``errors``."""
    return Problem(
        422,
        f"invalid-{what}",
        f"Invalid {what}",
        f"{field}: {reason}",
        errors=[{"field": field, "reason": reason}],
    )


def unauthorized(detail: str) -> Problem:
    return Problem(
        401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"}
    )


def invalid_request(errors: Sequence[Mapping[str, Any]], prefix: str = "") -> Problem:
    """422 naming each failing field of pydantic ``errors`` (``loc`` under ``prefix``)."""
    found = [
        {
            "field": field_path((prefix, *e["loc"]) if prefix else tuple(e["loc"])),
            "reason": e["msg"],
        }
        for e in errors
    ]
    fields = ", ".join(e["field"] for e in found)
    return Problem(422, "invalid-request", "Invalid request", f"invalid: {fields}", errors=found)


async def request_validation_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 for bad parameters, as problem+json naming each field."""
    problem = invalid_request(getattr(exc, "errors", list)())
    return problem.response(instance=request.url.path)


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on a FastAPI app."""
    app.add_exception_handler(Problem, problem_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)


def unknown_customer(customer: str) -> Problem:
    return Problem(404, "unknown-customer", "Unknown customer", f"no customer {customer!r}")
