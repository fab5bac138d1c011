"""A small pipelined HTTP/1.1 client for the per-request decisions.

httpx spends about 2 ms of CPU per request (its connection pool, anyio, its models),
which an API behind the middleware paid on every call.  Decisions need only a little
of HTTP: POST a small JSON body, read status, a few headers and a JSON body back.  So
here each connection is an ``asyncio.Protocol``: requests are written back to back
without waiting (pipelining), and answers, which HTTP/1.1 returns in order, are matched
to the oldest waiting request.  Parsing is httptools (llhttp, the parser uvicorn uses).

A connection that drops fails every request still waiting on it with ``Dropped``; the
caller may send them again on a new connection (``Pool.request`` does, once).  Never is
an answer handed to the wrong request: matching is by order on one connection only.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import httptools


class Dropped(ConnectionError):
    """The connection closed before this request's answer arrived."""


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    """Names in lower case; a repeated header keeps its last value."""
    body: bytes = b""


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``send`` may be called again before earlier answers."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[asyncio.Future[Reply]] = deque()
        self._parser = httptools.HttpResponseParser(self)
        self._reply = Reply(0)
        self._header = b""
        self._body: list[bytes] = []
        self._outgoing: list[bytes] = []
        self.closed = False

    # asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not asyncio's classes.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Dropped(f"unreadable answer from Tally: {exc}"))
        except httptools.HttpParserUpgrade:  # never asked for
            self._fail(Dropped("Tally switched protocols"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(Dropped(f"Tally closed the connection: {exc!r}" if exc else "closed by Tally"))

    # httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reply = Reply(0)
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._reply.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._reply.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        reply = self._reply
        reply.body = b"".join(self._body)
        if self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # a caller that timed out has gone
                waiter.set_result(reply)
        if not self._parser.should_keep_alive():
            self.close()

    # For the pool ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def send(self, raw: bytes) -> asyncio.Future[Reply]:
        """Write one complete request; the future resolves with its answer."""
        if self.closed or self._transport is None:
            raise Dropped("the connection is closed")
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiting.append(waiter)
        if not self._outgoing:
            loop.call_soon(self._write)
        self._outgoing.append(raw)
        return waiter

    def _write(self) -> None:
        """Everything sent during this turn of the event loop, in one system call: a
        write costs the app more CPU than the request it carries."""
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(outgoing))

    def close(self) -> None:
        self._fail(Dropped("the connection was closed"))

    def _fail(self, exc: Exception) -> None:
        if not self.closed and self._transport is not None:
            self._transport.close()  # nothing more can be matched on it
        self.closed = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(exc)


class Pool:
    """Up to ``size`` pipelined connections to one host; a request goes on the one with
    the fewest answers outstanding, and a new connection opens only when every open one
    already has ``depth`` requests waiting (so a quiet app keeps one connection); past
    ``size`` connections, requests queue deeper.

    After a failed connect, requests fail at once for ``pause`` seconds instead of each
    trying again: when Tally is down, the middleware's fail-open or fail-closed answer
    should cost microseconds, not a connect attempt per request.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        size: int = 16,
        depth: int = 2,
        pause: float = 0.25,
        tls: bool = False,
    ) -> None:
        if size < 1 or depth < 1:
            raise ValueError("a pool needs at least one connection and a depth of one")
        self.host, self.port = host, port
        self._tls = ssl.create_default_context() if tls else None
        self.size, self.depth, self.pause = size, depth, pause
        self._open: list[Connection] = []
        self._connecting: asyncio.Future[Connection] | None = None
        self._down_until = 0.0
        self._down_reason: Exception | None = None

    async def request(self, raw: bytes, within: float) -> Reply:
        """Send ``raw`` and wait up to ``within`` seconds for its answer.

        Sent once more, on a fresh connection, when the connection drops before
        answering: the requests this pool carries must be safe to repeat.  A connection
        that leaves a request unanswered past ``within`` seconds is closed: it is stuck, and
        the requests queued behind it on the same connection would wait as long.
        """
        connection: Connection | None = None
        try:
            async with asyncio.timeout(within):
                try:
                    connection = await self._connection()
                    return await connection.send(raw)
                except Dropped:
                    connection = await self._connection()
                    return await connection.send(raw)
        except TimeoutError:
            if connection is not None:
                connection.close()
            raise

    async def _connection(self) -> Connection:
        closed_at_once = 0
        while True:  # returns once a connection has room or `size` are open
            live = [c for c in self._open if not c.closed]
            if len(live) != len(self._open):
                self._open = live
            best = min(live, key=_load) if live else None
            if best is not None and (best.in_flight < self.depth or len(live) >= self.size):
                return best
            # Every open connection is `depth` deep: a new one (a local connect takes
            # about 100 µs) serves this request sooner than the queue it would join.
            # Concurrent callers share one attempt; a finished one is never awaited
            # again (awaiting a done future does not yield: the loop would spin).
            attempt = self._connecting
            if attempt is None or attempt.done():
                attempt = self._connecting = asyncio.ensure_future(self._connect())
            try:
                connection = await asyncio.shield(attempt)
            finally:
                if self._connecting is attempt and attempt.done():
                    self._connecting = None
            if connection.closed:
                closed_at_once += 1
                if closed_at_once == 3:
                    raise Dropped("Tally closed every new connection at once")

    async def _connect(self) -> Connection:
        if time.monotonic() < self._down_until:
            raise Dropped(f"Tally was unreachable a moment ago: {self._down_reason!r}")
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                Connection, self.host, self.port, ssl=self._tls
            )
        except OSError as exc:
            self._down_until, self._down_reason = time.monotonic() + self.pause, exc
            raise Dropped(f"cannot connect to Tally: {exc!r}") from exc
        self._open.append(connection)
        return connection

    def close(self) -> None:
        for connection in self._open:
            connection.close()
        self._open = []


def _load(connection: Connection) -> int:
    return connection.in_flight
