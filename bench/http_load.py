"""A small HTTP/1.1 load generator: keep-alive connections, pre-encoded requests.

httpx spends more CPU per request than the servers measured here, so a benchmark
driven by it would measure httpx.  This speaks just enough HTTP/1.1 (Content-Length
bodies, keep-alive) to keep the client cheap.  Latency in the open loop is measured
from when a request was due, not when a connection was free to send it, so a stalled
server shows as latency instead of hiding as a lower offered rate.  While it measures,
its own garbage collector is held off (``collector_paused``): a full collection of this
process paused it for 15 to 30 ms, which the measurement would have blamed on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass
class Result:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    client_cpu_s: float | None = None  # what the requests cost the client, when measured
    server_cpu_s: float | None = None  # and the server, when measured

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000

    def median_and_p99(self, digits: int = 2) -> dict[str, float]:
        """``p50_ms`` and ``p99_ms``, rounded to ``digits``."""
        return {
            "p50_ms": round(statistics.median(self.latencies) * 1000, digits),
            "p99_ms": round(self.percentile(0.99), digits),
        }

    def summary(self) -> dict[str, object]:
        summary: dict[str, object] = {
            "requests": len(self.latencies),
            "per_second": round(self.per_second),
            **self.median_and_p99(),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }
        if self.client_cpu_s is not None:
            summary["client_cpu_us_per_request"] = round(
                self.client_cpu_s / len(self.latencies) * 1e6
            )
        return summary


Requests = Sequence[bytes] | Iterator[bytes]
"""Pre-encoded requests: a sequence is sent round and round, an iterator is drawn from
(one that never runs dry, for requests that must not repeat)."""


def _source(requests: Requests) -> Iterator[bytes]:
    return requests if isinstance(requests, Iterator) else itertools.cycle(requests)


def request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str], method: str = "POST"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += ["Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection in this process for the length of one measurement."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def closed_loop(
    host: str, port: int, requests: Requests, connections: int, seconds: float
) -> Result:
    """As fast as the server answers: each connection sends its next request on reply."""
    pool = [await Connection.open(host, port) for _ in range(connections)]
    deadline = time.perf_counter() + seconds
    result = Result(seconds)
    source = _source(requests)

    async def run(conn: Connection) -> None:
        while (started := time.perf_counter()) < deadline:
            status = await conn.send(next(source))
            result.latencies.append(time.perf_counter() - started)
            result.statuses[status] = result.statuses.get(status, 0) + 1

    with collector_paused():
        begin = time.perf_counter()
        await asyncio.gather(*(run(c) for c in pool))
        result.seconds = time.perf_counter() - begin
    for conn in pool:
        conn.close()
    return result


async def open_loop(
    host: str, port: int, requests: Requests, rate: float, seconds: float, connections: int
) -> Result:
    """Requests due at a fixed rate, whatever the server does."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await Connection.open(host, port))
    result = Result(seconds)
    source = _source(requests)

    async def one(due: float) -> None:
        conn = await idle.get()
        status = await conn.send(next(source))
        result.latencies.append(time.perf_counter() - due)
        result.statuses[status] = result.statuses.get(status, 0) + 1
        idle.put_nowait(conn)

    with collector_paused():
        begin = time.perf_counter()
        tasks = []
        for n in range(int(rate * seconds)):
            due = begin + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - begin
    while not idle.empty():
        idle.get_nowait().close()
    return result
