"""A TCP fault proxy: put it in front of a real store (Kafka, Redis, PostgreSQL) and
make that store fail the ways networks do, while the test watches Tally.

- ``restore()`` (the start state): bytes pass both ways;
- ``cut()``: every connection is closed and new ones are refused (the port stops
  listening) — a store that is down;
- ``delay(seconds)``: every chunk waits that long before it is passed on — a slow link;
- ``blackhole()``: connections are taken and held, nothing is passed on either way —
  a frozen server or a dead host behind a live load balancer. Leaving the blackhole
  closes the held connections (their byte streams lost chunks; a client must reconnect).

The proxy runs its own event loop on a thread, so sync and async tests use it alike::

    with FaultProxy(redis_port) as proxy:
        settings = settings.model_copy(update={"redis_url": proxy.url("redis", "/9")})
        proxy.blackhole()
        ...
        proxy.restore()
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from services.common.broker import free_port

T = TypeVar("T")
CHUNK = 64 * 1024


class Mode(enum.Enum):
    PASS = "pass"
    CUT = "cut"
    DELAY = "delay"
    BLACKHOLE = "blackhole"


class FaultProxy:
    """Listens on ``127.0.0.1:port`` and forwards to ``target_host:target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port(avoid=(target_port,))
        self.mode = Mode.PASS
        self.delay_seconds = 0.0
        self.connections = 0  # accepted so far, for tests that check the client came
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, scheme: str, rest: str = "") -> str:
        return f"{scheme}://{self.address}{rest}"

    # the API tests use: each call returns once the proxy is in its new state
    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    def stop(self) -> None:
        self._run(self._set(Mode.CUT))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def restore(self) -> None:
        self._run(self._set(Mode.PASS))

    def cut(self) -> None:
        self._run(self._set(Mode.CUT))

    def delay(self, seconds: float) -> None:
        self.delay_seconds = seconds
        self._run(self._set(Mode.DELAY))

    def blackhole(self) -> None:
        self._run(self._set(Mode.BLACKHOLE))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # on the proxy's loop
    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(10)

    async def _set(self, mode: Mode) -> None:
        leaving_blackhole = self.mode is Mode.BLACKHOLE and mode is not Mode.BLACKHOLE
        self.mode = mode
        if mode is Mode.CUT or leaving_blackhole:
            for link in list(self._links):
                link.close()
        if mode is Mode.CUT and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif mode is not Mode.CUT and self._server is None:
            await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(self, writer)
        self._links.add(link)
        try:
            await link.serve(reader)
        finally:
            self._links.discard(link)
            link.close()


class _Link:
    """One client connection and, unless blackholed from the start, its upstream."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers = [client]
        self.tasks: list[asyncio.Task[None]] = []

    async def serve(self, client: asyncio.StreamReader) -> None:
        if self.proxy.mode is Mode.BLACKHOLE:
            await self._pump(client, None)  # hold the connection, answer nothing
            return
        try:
            upstream, upstream_writer = await asyncio.open_connection(*self.proxy.target)
        except OSError:
            return  # the store itself is down: the client sees its connection closed
        self.writers.append(upstream_writer)
        self.tasks = [
            asyncio.create_task(self._pump(client, upstream_writer)),
            asyncio.create_task(self._pump(upstream, self.writers[0])),
        ]
        await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter | None) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while chunk := await source.read(CHUNK):
                mode = self.proxy.mode
                if mode is Mode.BLACKHOLE or sink is None:
                    continue  # swallowed
                if mode is Mode.DELAY:
                    await asyncio.sleep(self.proxy.delay_seconds)
                sink.write(chunk)
                await sink.drain()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()  # a reset, as a dead peer's kernel would send
