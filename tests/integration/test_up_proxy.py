"""`tally up`'s front forwards what it does not serve to back: the request as it came
(method, path, query, headers, body, the client in X-Forwarded-For), the answer as it
came; a back that is down is a 503 problem+json, never a hang or a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.broker import free_port
from services.up.proxy import Forwarder
from tests.http_support import serving


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "forwarded_for": request.headers.get("x-forwarded-for"),
            "token": request.headers.get("authorization"),
            "body": body.decode(),
        },
        status_code=201,
        headers={"X-Back": "yes"},
    )


@pytest.fixture
async def back() -> AsyncIterator[str]:
    """A real HTTP server on a loopback port, standing in for back."""
    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST", "PUT"])])
    async with serving(app) as url:
        yield url


def front(forwarder: Forwarder) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(forwarder, client=("203.0.113.7", 4000))
    return httpx.AsyncClient(transport=transport, base_url="http://tally")


async def test_a_request_goes_to_back_and_its_answer_comes_back_as_they_were(back: str) -> None:
    forwarder = Forwarder(back)
    async with front(forwarder) as client:
        answer = await client.put(
            "/v1/customers/c%2F1/invoices?limit=5&x=%20",
            content=b"a body",
            headers={"Authorization": "Bearer t"},
        )
    await forwarder.aclose()
    assert answer.status_code == 201 and answer.headers["x-back"] == "yes"
    assert answer.json() == {
        "method": "PUT",
        "path": "/v1/customers/c/1/invoices",
        "query": "limit=5&x=%20",
        "forwarded_for": "203.0.113.7",
        "token": "Bearer t",
        "body": "a body",
    }


async def test_a_back_that_is_down_is_a_503_problem_with_retry_after() -> None:
    forwarder = Forwarder(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with front(forwarder) as client:
        answer = await client.get("/v1/customers/c/invoices")
    await forwarder.aclose()
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"].endswith("/back-unavailable")
