"""The front process of ``tally up`` forwards what it does not serve to the back one.

``tally up`` runs ingest and the API in one process (front, on the user's port) and the
aggregator, billing and analytics SQL in another (back, owning chDB, on a private
loopback port).  The user still sees one port: every request front has no route for —
invoices, the revenue pages, Stripe webhooks, alerts, notifications, analytics SQL — is
forwarded to back as it came (method, path, query, headers, body streamed both ways, on
kept-alive connections), with ``X-Forwarded-For`` naming the client so that back's
per-address limits and logs see who asked.  A back that does not answer is a 503
problem+json (nothing reached it: safe to retry); one that fails mid-answer, a 502.

Front's ``/openapi.json`` (and so ``/docs``) documents back's routes too, and its
``/readyz`` lists back's checks, each as ``back.<name>``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from schemas.problem_types import BACK_FAILED, BACK_UNAVAILABLE
from services.common.health import Check
from services.common.logging import get_logger
from services.common.problems import Problem
from services.runtime import Component, Runtime, Starter

log = get_logger("tally.up")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
    }
)
"""Headers that describe one connection, not the message (RFC 9110 §7.6.1), and the
forwarding headers front writes itself."""
FRONT_WRITES = frozenset({"date", "server"})
"""Response headers front's uvicorn writes on every answer: back's are dropped, or the
client would get each twice (Date is a singleton field, RFC 9110 §6.6.1)."""
SPEC_WAIT_SECONDS = 80.0
SPEC_POLL_SECONDS = 0.1
"""Front serves once it has back's document: asked often, it waits less for back."""
READINESS_CACHE_SECONDS = 0.5
READINESS_ASK_SECONDS = 3.0


class Forwarder:
    """An ASGI application that sends each request on to ``base_url``, streaming."""

    def __init__(self, base_url: str, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=2.0, pool=5.0),
            limits=limits,
            follow_redirects=False,
        )
        for name in ("accept", "accept-encoding", "user-agent"):  # httpx's defaults:
            del self.client.headers[name]  # the client's own (or none) go through

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = self.client.build_request(
            scope["method"],
            self._url(scope),
            headers=_forwarded_headers(scope),
            content=_body(receive) if _has_body(scope) else None,
        )
        try:
            response = await self.client.send(request, stream=True)
        except ClientDisconnect:  # mid-body: back's connection is dropped, no one to answer
            return
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            # no connection to back was had: nothing of the request reached it
            await _problem(scope, receive, send, _unavailable())
            return
        except httpx.HTTPError as exc:
            await _problem(scope, receive, send, _failed(exc))
            return
        dropped = HOP_BY_HOP | FRONT_WRITES | _connection_options(response.headers.raw)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.decode("latin-1").lower() not in dropped
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError as exc:  # the status has gone: all we can do is cut it
            log.warning("back failed mid-answer", path=scope["path"], error=repr(exc))
            raise
        finally:
            await response.aclose()

    def _url(self, scope: Scope) -> str:
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope.get("raw_path") or scope["path"].encode()
        return f"{self.base_url}{path.decode('latin-1')}" + (f"?{query}" if query else "")


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return b"content-length" in headers or b"transfer-encoding" in headers


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            # not the end of the body: ending the stream here would send back a
            # truncated body as a whole one (chunked, nothing checks its length)
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _connection_options(headers: list[tuple[bytes, bytes]]) -> frozenset[str]:
    """The headers a ``Connection`` header names: hop-by-hop too (RFC 9110 §7.6.1)."""
    return frozenset(
        name.strip().lower()
        for key, value in headers
        if key.lower() == b"connection"
        for name in value.decode("latin-1").split(",")
    )


def _forwarded_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers without the hop-by-hop ones, plus who asked: the client
    front resolved (uvicorn already applied a trusted proxy's ``X-Forwarded-For``)."""
    dropped = HOP_BY_HOP | _connection_options(scope["headers"])
    headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1") not in dropped]
    client = scope.get("client")
    if client:
        headers.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
    headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode("latin-1")))
    return headers


def _unavailable() -> Problem:
    return Problem(
        BACK_UNAVAILABLE,
        "this route is served by tally up's back process (aggregator, billing, analytics),"
        " which is not answering — it is restarting or stopped; nothing reached it, retry",
        headers={"Retry-After": "1"},
    )


def _failed(exc: Exception) -> Problem:
    return Problem(
        BACK_FAILED,
        f"tally up's back process did not finish answering ({type(exc).__name__}); the"
        " request may have reached it",
    )


async def _problem(scope: Scope, receive: Receive, send: Send, problem: Problem) -> None:
    log.warning("forwarding failed", path=scope["path"], problem=problem.kind.slug)
    await problem.response(instance=scope["path"])(scope, receive, send)


class BackReadiness:
    """Back's ``/readyz``, asked at most once per ``READINESS_CACHE_SECONDS`` however
    many of its checks front's ``/readyz`` runs."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._url = url
        self._asked: tuple[float, asyncio.Task[dict[str, str]]] | None = None

    async def report(self) -> dict[str, str]:
        now = time.monotonic()
        if self._asked is None or now - self._asked[0] > READINESS_CACHE_SECONDS:
            self._asked = (now, asyncio.ensure_future(self._ask()))
        return await asyncio.shield(self._asked[1])

    async def _ask(self) -> dict[str, str]:
        try:
            # longer than back's own bound on each check (2 s), so that a check that
            # hangs there is reported by its name, not as back unreachable
            answer = await self._client.get(self._url, timeout=READINESS_ASK_SECONDS)
            checks: dict[str, str] = answer.json()["checks"]
            return checks
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return {"reachable": f"failed: {exc!r}"}

    def check(self, name: str) -> Check:
        async def check() -> None:
            report = await self.report()
            status = report.get(name) or report.get("reachable")
            if status is None and name == "reachable":
                # back did not answer when front started, so front knows none of its
                # checks by name: it stands for them all now that back answers
                failed = {k: v for k, v in report.items() if v != "ok"}
                status = f"failed: {failed}" if failed else "ok"
            status = status or "failed: not reported"
            if status != "ok":
                raise RuntimeError(f"back: {status}")

        return check


async def back_spec(client: httpx.AsyncClient, base_url: str) -> dict[str, Any]:
    """Back's OpenAPI document, waiting for back to answer (the supervisor starts both
    at once, and back takes longer); empty if it never does."""
    deadline = time.monotonic() + SPEC_WAIT_SECONDS
    while True:
        try:
            answer = await client.get(f"{base_url}/openapi.json", timeout=5.0)
            answer.raise_for_status()
            spec: dict[str, Any] = answer.json()
            return spec
        except (httpx.HTTPError, ValueError) as exc:
            if time.monotonic() > deadline:
                log.error(
                    "back's OpenAPI not read: /docs shows front's routes only", error=repr(exc)
                )
                return {}
            await asyncio.sleep(SPEC_POLL_SECONDS)


def starter(base_url: str) -> Starter:
    """The front's forwarding component, for ``serve``: what no route of front matches
    goes to back; back's paths in the OpenAPI document, back's checks in ``/readyz``."""

    async def start(runtime: Runtime) -> Component:
        forwarder = Forwarder(base_url)
        runtime.stack.push_async_callback(forwarder.aclose)
        spec = await back_spec(forwarder.client, forwarder.base_url)
        readiness = BackReadiness(forwarder.client, f"{forwarder.base_url}/readyz")
        names = list((await readiness.report()).keys())
        return Component(
            "back",
            checks={name: readiness.check(name) for name in names},
            schemas=spec.get("components", {}).get("schemas", {}),
            paths=spec.get("paths", {}),
            fallback=forwarder,
        )

    return start
