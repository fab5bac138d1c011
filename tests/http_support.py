"""A real HTTP server on a loopback port, for clients that bring their own transport
(they cannot be handed an in-process ASGI one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.types import Message

from services.common.broker import free_port


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """``app`` served by uvicorn on this loop; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # up to 10 s
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def arriving(chunks: list[bytes], pause: float | None = None) -> Request:
    """A POST whose body comes as ``chunks``, ``pause`` seconds apart; with no pause
    given, the last chunk never ends the body: the client stalls after it."""
    queue = list(chunks)

    async def receive() -> Message:
        if not queue:
            await asyncio.Event().wait()  # stalled: no more bytes, no disconnect
        chunk = queue.pop(0)
        if pause is not None:
            await asyncio.sleep(pause)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue) or pause is None}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", b"application/json")],
    }
    return Request(scope, receive)
