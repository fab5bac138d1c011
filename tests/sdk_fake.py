"""A stand-in Tally for the SDK's own tests: a real HTTP/1.1 server on a local port that
records what it was sent and answers as each test scripts it.

It reads requests one after another per connection and answers each in turn, as
HTTP/1.1 servers do with pipelined requests, so the order of answers on a connection is
the order of requests; ``answer`` may sleep (to hold requests back) or return ``None``
to close the connection without answering.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    connection: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        raw = self.body
        if self.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        return json.loads(raw)


Answer = tuple[int, dict[str, str], bytes]
Script = Callable[[Seen], Awaitable[Answer | None]]


@dataclass
class FakeTally:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Answer:
    return status, headers or {}, json.dumps(body).encode()


async def allow_all(seen: Seen) -> Answer | None:
    """Every decision allowed for customer ``cus_1``; every event batch accepted."""
    if seen.path.endswith("/v1/events"):
        events = seen.json()
        results = [{"index": n, "status": "accepted"} for n in range(len(events))]
        return reply(202, {"results": results})
    return reply(200, {"allowed": True, "customer": "cus_1"}, {"RateLimit": '"p";r=9;t=1'})


@asynccontextmanager
async def fake_tally(script: Script = allow_all) -> AsyncIterator[FakeTally]:
    fake = FakeTally()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fake.connections += 1
        number = fake.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                start, *lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in filter(None, lines):
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                method, path, _ = start.split(" ")
                seen = Seen(number, method, path, headers, body)
                fake.seen.append(seen)
                answer = await script(seen)
                if answer is None:
                    return
                status, extra, content = answer
                out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(content)}"]
                out += ["Content-Type: application/json", *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + content)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        await server.wait_closed()
