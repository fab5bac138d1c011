"""Hot paths answer as the application would: problems, failures, methods, the rest."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.testing import capture_logs

from services.common.problems import PROBLEM_JSON, invalid_field
from services.runtime import Component, http_app


async def decide(request: Request) -> Response:
    body = await request.json()
    if body.get("fail"):
        raise RuntimeError("a bug")
    if "meter" not in body:
        raise invalid_field("meter", "required")
    return JSONResponse({"meter": body["meter"], "client": request.client and request.client.host})


def application() -> ASGIApp:
    """Hot paths ahead of a FastAPI router, as ``http_app`` puts them together."""
    slow = APIRouter()

    @slow.get("/v1/other")
    async def other() -> dict[str, str]:
        return {"served": "by FastAPI"}

    @slow.post("/v1/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    async def owner(request: Request) -> Response:
        return JSONResponse({"customer": request.path_params["customer"]})

    fast = [
        Route("/v1/decide", decide, methods=["POST"]),
        Route("/v1/customers/{customer}/owner", owner, methods=["GET"]),
    ]
    return http_app([Component("test", routers=[slow], fast_routes=fast)])


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(application(), client=("198.51.100.7", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def test_a_hot_path_answers_ahead_of_the_application(client: httpx.AsyncClient) -> None:
    reply = await client.post("/v1/decide", json={"meter": "api_calls"})
    assert reply.status_code == 200
    assert reply.json() == {"meter": "api_calls", "client": "198.51.100.7"}
    assert (await client.get("/v1/other")).json() == {"served": "by FastAPI"}


async def test_its_problems_are_problem_json_naming_the_path(client: httpx.AsyncClient) -> None:
    reply = await client.post("/v1/decide", json={})
    assert reply.status_code == 422
    assert reply.headers["content-type"] == PROBLEM_JSON
    assert reply.json()["errors"] == [{"field": "meter", "reason": "required"}]
    assert reply.json()["instance"] == "/v1/decide"


async def test_a_failure_is_a_500_problem_not_a_dropped_connection(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post("/v1/decide", json={"fail": True})
    assert reply.status_code == 500
    assert reply.headers["content-type"] == PROBLEM_JSON
    assert reply.json()["type"].endswith("/internal-error")


async def test_another_method_or_path_falls_through_to_the_router(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/v1/decide")).status_code == 405
    assert (await client.get("/v1/nothing")).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "hint"),
    [
        ("POST", "/v1/decide/", "/v1/decide"),  # a hot path
        ("POST", "/v1/other/", "/v1/other"),  # served for GET only: named all the same
        ("DELETE", "/v1/customers/acme/owner/", "/v1/customers/acme/owner"),
        ("GET", "/v1/nothing/", None),
        ("POST", "/v1/nothing", None),
    ],
)
async def test_a_path_served_without_its_slash_is_a_404_naming_it(
    client: httpx.AsyncClient, method: str, path: str, hint: str | None
) -> None:
    """Not a bare 307: a client that does not follow it learns nothing, one that does
    sends a POST's body twice."""
    reply = await client.request(method, path, json={"meter": "m"})
    assert reply.status_code == 404
    assert reply.headers["content-type"] == PROBLEM_JSON
    served = f"; it is served at {hint}"
    assert reply.json()["detail"] == f"nothing is served at {path}" + (served if hint else "")


@pytest.mark.parametrize(
    ("path", "there"),
    [
        ("/v1/other/", "/v1/other"),  # a FastAPI route
        ("/v1/customers/acme/owner/?x=1", "/v1/customers/acme/owner?x=1"),
        ("/docs/", "/docs"),  # a page, asked for as a browser might
    ],
)
async def test_a_get_with_a_slash_too_many_is_redirected(
    client: httpx.AsyncClient, path: str, there: str
) -> None:
    reply = await client.get(path)
    assert reply.status_code == 307
    assert reply.headers["location"] == "http://t" + there
    assert (await client.head(path)).status_code == 307


async def test_a_path_served_here_is_answered_here_not_sent_to_the_fallback() -> None:
    """In ``tally up`` what front serves no route of goes on to back (the fallback),
    where no route knows front's paths: a slash too many is answered by front."""
    sent: list[str] = []

    async def fallback(scope: Scope, receive: Receive, send: Send) -> None:
        sent.append(scope["path"])
        await JSONResponse({"from": "the fallback"})(scope, receive, send)

    slow = APIRouter()

    @slow.get("/v1/other")
    async def other() -> dict[str, str]:
        return {"served": "by FastAPI"}

    component = Component("front", routers=[slow], fallback=fallback)
    transport = httpx.ASGITransport(http_app([component]))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/v1/other/")).status_code == 307
        assert (await client.post("/v1/other/")).json()["detail"].endswith("/v1/other")
        assert (await client.get("/v1/elsewhere/")).json() == {"from": "the fallback"}
    assert sent == ["/v1/elsewhere/"]


@pytest.mark.parametrize("path", ["/v1/decide", "/v1/upload"])
async def test_a_client_gone_before_its_body_arrived_is_no_server_error(path: str) -> None:
    """A client that hangs up mid-upload: no one to answer and nothing failed here, so no
    500 and no traceback in the error log, on a hot path or through FastAPI."""
    incoming: list[Message] = [
        {"type": "http.request", "body": b'{"meter": "api', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "client": ("198.51.100.7", 4000),
        "server": ("t", 80),
    }
    with capture_logs() as logs:
        await application()(scope, receive, send)
    assert sent[0]["status"] == 400
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("client disconnected before its request was read", "info")
    ]
