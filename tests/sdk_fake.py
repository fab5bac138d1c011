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
    """Every decision allowed for customer ``cus_1`` (leases of what is wanted); every
    event batch accepted."""
    if seen.path.endswith("/v1/events"):
        events = seen.json()
        minimal = seen.headers.get("prefer") == "return=minimal"
        results = (
            [] if minimal else [{"index": n, "status": "accepted"} for n in range(len(events))]
        )
        return reply(202, {"accepted": len(events), "duplicates": 0, "results": results})
    if seen.path.endswith("/v1/leases/return"):
        return reply(200, {"lease": seen.json()["lease"], "returned": 0, "held": 0})
    if seen.path.endswith("/v1/leases"):
        asked = seen.json()
        body = {"lease": asked.get("lease", "ls_fake0000000000000"), "granted": asked["want"]}
        return reply(200, LEASE_ANSWER | body, {"RateLimit": '"p";r=9;t=1'})
    return reply(200, {"allowed": True, "customer": "cus_1"}, {"RateLimit": '"p";r=9;t=1'})


LEASE_ANSWER = {"allowed": True, "customer": "cus_1", "ttl_ms": 2000, "plan": "pro"}


@dataclass
class LeaseModel:
    """A Tally granting leases against a hard quota of ``room`` calls as ``lease.lua``
    does (at most ``room // share``, at least one), counting what each lease reported
    spent, so a test can check that the units served are exactly the units reported.
    As lease.lua, it keeps each lease's term number and last numbered answer: the same
    request again gets that answer, any other term than the next is refused (404,
    nothing changed).  With ``drop`` set, the answers to that many lease requests are
    lost (the connection closes once the grant is made), as on a dropped connection."""

    room: int
    share: int = 8
    ttl_ms: int = 2000
    drop: int = 0
    grants: dict[str, int] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)
    returned: list[str] = field(default_factory=list)
    terms: dict[str, int] = field(default_factory=dict)  # lease -> its term number
    answers: dict[str, tuple[int, Answer]] = field(default_factory=dict)  # the last one
    _ids: int = 0

    async def __call__(self, seen: Seen) -> Answer | None:
        if seen.path.endswith("/v1/events"):
            return await allow_all(seen)
        asked = seen.json()
        lease, term = asked.get("lease"), asked.get("term")
        last = self.answers.get(str(lease))
        returning = seen.path.endswith("/return")
        if term is not None and last is not None and last[0] == term and not returning:
            return last[1]  # a resend: answered, not granted, again
        if lease is not None and (returning or term != 1):  # the unspent rest first
            if lease not in self.grants:
                return reply(404, {"type": UNKNOWN_LEASE, "status": 404})
            expected = self.terms[lease] + (0 if returning else 1)
            if term is not None and term != expected:
                return reply(404, {"type": UNKNOWN_LEASE, "status": 404, "stale": True})
            self._settle(lease, int(asked["spent"]))
        if returning:
            self.returned.append(str(lease))
            self.answers.pop(str(lease), None)
            return reply(200, {"lease": lease, "returned": 0, "held": 0})
        if self.room == 0:
            refusal = {"type": QUOTA, "status": 429, "policy": "quota:api_calls", "retry_after": 1}
            return reply(429, refusal, {"Retry-After": "1", "RateLimit": '"q";r=0;t=1'})
        granted = min(int(asked["want"]), max(1, self.room // self.share))
        if lease is None:
            self._ids += 1
            lease = f"ls_fake{self._ids:012d}"
        assert term != 1 or lease not in self.grants, f"lease {lease} taken twice"
        self.grants[lease], self.room = granted, self.room - granted
        self.terms[lease] = self.terms.get(lease, 0) + 1
        body = LEASE_ANSWER | {"lease": lease, "granted": granted, "ttl_ms": self.ttl_ms}
        answer = reply(200, body, {"RateLimit": f'"q";r={self.room};t=1'})
        if term is not None:
            self.answers[lease] = (term, answer)
        if self.drop:
            self.drop -= 1
            return None
        return answer

    def _settle(self, lease: str, spent: int) -> None:
        granted = self.grants[lease]
        assert 0 <= spent <= granted, (lease, spent, granted)
        self.spent[lease] = self.spent.get(lease, 0) + spent
        self.room += granted - spent
        self.grants[lease] = 0

    @property
    def total_spent(self) -> int:
        return sum(self.spent.values())


UNKNOWN_LEASE = "https://tally.dev/problems/unknown-lease"
QUOTA = "https://tally.dev/problems/quota-exceeded"


@asynccontextmanager
async def fake_tally(script: Script = allow_all) -> AsyncIterator[FakeTally]:
    fake = FakeTally()
    open_: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fake.connections += 1
        number = fake.connections
        task = asyncio.current_task()
        assert task is not None
        open_[task] = writer
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
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
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client, or ``_ended``, closed the connection
        finally:
            open_.pop(task, None)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        await _ended(open_)
        await server.wait_closed()


async def _ended(open_: dict[asyncio.Task[None], asyncio.StreamWriter]) -> None:
    """End the connections still open by closing them, so that their handlers return
    (a handler cancelled at the loop's end makes Python 3.11's stream callback log
    its ``CancelledError``)."""
    handlers = list(open_)
    for writer in list(open_.values()):
        writer.close()
    if handlers:
        await asyncio.wait(handlers, timeout=2)
