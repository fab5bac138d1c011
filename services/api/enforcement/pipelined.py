"""A pipelining Redis connection for the enforcement hot path.

On these machines a request/response round trip through redis-py's asyncio client
costs about 150 µs of CPU, as much as FastAPI spends on a whole request, because every
command pays for its own wake-ups and system calls.  Here every decision in flight
shares one connection: each writes its command at once and awaits its reply, and one
read hands out as many replies as have arrived (hiredis parses them, in order).  Under
load, the system calls are paid per batch instead of per decision.

Everything other than the enforcement script keeps using redis-py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.common.redis import pack
from services.common.waits import stop_task

Arg = str | bytes | int


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.sent_at: deque[float] = deque()
        self.heard_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.heard_at = asyncio.get_running_loop().time()
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiting.popleft()
            self.sent_at.popleft()
            if waiter.done():  # its caller went away: the reply is dropped, order kept
                continue
            if isinstance(reply, ResponseError):
                waiter.set_exception(reply)
                if str(reply).startswith("READONLY") and self.transport:
                    self.transport.abort()  # a replica now: reconnect, maybe to the new primary
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.sent_at.clear()
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(RedisConnectionError(f"connection lost: {exc!r}"))

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiting.append(waiter)
        self.sent_at.append(loop.time())
        self.transport.write(packed)
        return waiter

    def stalled(self, timeout: float) -> bool:
        """Replies come in order, so the oldest one waiting tells if Redis is late —
        unless replies are still arriving, and only this process is slow to read them."""
        now = asyncio.get_running_loop().time()
        late = bool(self.sent_at) and now - self.sent_at[0] > timeout
        return late and now - self.heard_at > timeout


class Pipelined:
    """One connection to ``url``, opened on first use and again after it is lost.

    Instead of a timer per command, a watchdog checks every quarter ``timeout`` that
    the oldest command waiting is younger than ``timeout``; if not, the connection is
    dropped and every command waiting on it fails with a ``ConnectionError``.

    A circuit breaker keeps a Redis that is down from costing every decision its
    timeout: a connection that stalls or cannot be opened *trips* it, and from then on
    commands fail at once (the enforcer decides by its fallback, or fails closed) while
    a background probe reconnects, one attempt per ``timeout``. No request waits on a
    probe; the first command after a probe succeeds uses the new connection.
    """

    def __init__(self, url: str, timeout: float) -> None:
        if not url.startswith("redis://"):
            raise ValueError(
                "the enforcement path connects to redis:// URLs only (no TLS or unix sockets yet)"
            )
        self._options = parse_url(url)
        self._timeout = timeout
        self._tripped_at: float | None = None  # the breaker is open since then
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Lock | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    async def execute(self, packed: bytes) -> Any:
        """Send one packed command; its reply, or redis-py's exception for it."""
        protocol = await self._connected()
        return await protocol.send(packed)

    async def aclose(self) -> None:
        for task in (self._watchdog, self._probe):
            if task is not None:
                await stop_task(task)
        self._watchdog = self._probe = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    @property
    def tripped(self) -> bool:
        """Is the breaker open (Redis failed lately, commands fail at once)?"""
        return self._tripped_at is not None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._timeout / 4)
            protocol = self._protocol
            if protocol and protocol.transport and protocol.stalled(self._timeout):
                self._trip()
                protocol.transport.abort()

    def _trip(self) -> None:
        self._tripped_at = asyncio.get_running_loop().time()

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            return protocol
        if self._tripped_at is not None:
            self._probe_when_due(self._tripped_at)
            raise RedisConnectionError("Redis failed a moment ago (circuit open; probing)")
        self._opening = self._opening or asyncio.Lock()
        async with self._opening:
            if self._protocol is None or self._protocol.transport is None:
                if self._tripped_at is not None:  # what we waited behind just failed
                    raise RedisConnectionError("Redis failed a moment ago (circuit open)")
                try:
                    self._protocol = await self._open()
                except RedisConnectionError:
                    self._trip()
                    raise
            self._start_watchdog()
            return self._protocol

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="redis-watchdog")

    def _probe_when_due(self, tripped_at: float) -> None:
        """One reconnection attempt at a time, one ``timeout`` after the last failure."""
        due = asyncio.get_running_loop().time() - tripped_at >= self._timeout
        if due and (self._probe is None or self._probe.done()):
            self._probe = asyncio.create_task(self._reconnect(), name="redis-probe")

    async def _reconnect(self) -> None:
        try:
            protocol = await self._open()
        except RedisConnectionError:
            self._trip()
            return
        self._protocol, self._tripped_at = protocol, None
        self._start_watchdog()

    async def _open(self) -> _Protocol:
        options = self._options
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._timeout):
                _, protocol = await loop.create_connection(
                    _Protocol, options.get("host", "127.0.0.1"), options.get("port", 6379)
                )
                if options.get("password"):
                    user = options.get("username")
                    auth = (user, options["password"]) if user else (options["password"],)
                    await protocol.send(pack("AUTH", *auth))
                await protocol.send(pack("SELECT", options.get("db", 0)))
        except (OSError, TimeoutError, ResponseError) as exc:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
            raise RedisConnectionError(f"cannot use Redis: {exc!r}") from exc
        return protocol
