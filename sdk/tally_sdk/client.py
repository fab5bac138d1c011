"""``Tally``: the async client a metered service keeps for its whole life.

Two jobs with opposite needs share it.  Emitting usage must never slow the caller down,
so ``emit`` only buffers and a background task sends gzip-compressed batches (a request
per batch, on a keep-alive connection of its own; httpx took 1-2 ms of the event loop
per batch).  Enforcement sits on the request
path and must answer at once and cheaply, so ``check`` and ``reserve`` go over a few
keep-alive connections of ``tally_sdk.pipelined``, requests from concurrent callers
written back to back (tens of µs of CPU per decision, where httpx took about 2 ms), with
a short timeout; a request whose connection dropped is sent once more on a new one
(both are safe to repeat: a reservation names its event).  What to do when Tally does
not answer is the caller's policy (``TallyMiddleware``'s ``fail_open``), not the SDK's.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from tally_sdk.answers import json_object
from tally_sdk.backoff import Backoff
from tally_sdk.buffer import Overflow
from tally_sdk.decision import Decision
from tally_sdk.emitter import Emitter
from tally_sdk.errors import error_of, unavailable
from tally_sdk.events import Dimension, Value, completed, usage_event
from tally_sdk.pipelined import Dropped, Pool, Reply
from tally_sdk.reports import EmitStats, OnUndelivered, Reporter

Mode = Literal["check", "reserve"]
DECISION_STATUSES = frozenset({200, 403, 429})


class Tally:
    """A client of one Tally deployment.

    ``token`` is a service token: it emits events for any customer and enforces for the
    customer named by ``customer=``.  ``source`` is the CloudEvents source of every event
    this client emits; with the event ids it makes retries idempotent, so keep it stable
    per service (the default is the host name).  ``compress`` gzips event batches;
    ``enforce_connections`` bounds the connections decisions share.

    Events leave every ``max_delay`` seconds or ``max_batch`` events, whichever comes
    first (those left behind by a full batch count their ``max_delay`` from when it
    left): what Tally spends on a batch is largely fixed (the request, a Kafka record,
    a ClickHouse insert and its merges, one aggregation per customer in it), so up to
    10,000 events/s a batch is the half-second's worth, and above that 5,000 events
    (measured at 3,000 events/s: Tally's CPU per event 155 µs with batches of 2,000, 228
    µs with 500; at 9,000/s, ``bench.emit_cost``, see ``docs/benchmarks.md``).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        source: str | None = None,
        max_batch: int = 5000,
        max_delay: float = 0.5,
        max_buffer: int = 10_000,
        overflow: Overflow = "raise",
        backoff: Backoff | None = None,
        timeout: float = 10.0,
        enforce_timeout: float = 2.0,
        close_timeout: float = 10.0,
        on_undelivered: OnUndelivered | None = None,
        compress: bool = True,
        enforce_connections: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.source = source or socket.gethostname()
        self.enforce_timeout = enforce_timeout
        self.close_timeout = close_timeout
        self._enforce_url = _EnforceTarget(self.base_url, token)
        self._pool = Pool(
            self._enforce_url.host,
            self._enforce_url.port,
            size=enforce_connections,
            tls=self._enforce_url.tls,
        )
        # Event batches on a connection of their own: a large batch queued ahead of a
        # decision on a pipelined connection would hold the decision up.
        self._events_pool = Pool(
            self._enforce_url.host, self._enforce_url.port, size=1, tls=self._enforce_url.tls
        )
        self._timeout = timeout
        self._reporter = Reporter(on_undelivered)
        self._emitter = Emitter(
            self._post_events,
            self._reporter,
            max_buffer=max_buffer,
            overflow=overflow,
            max_batch=max_batch,
            max_delay=max_delay,
            backoff=backoff or Backoff(),
            compress=compress,
        )

    @property
    def stats(self) -> EmitStats:
        return self._reporter.stats

    # Emitting ----------------------------------------------------------------------

    def emit(
        self,
        type: str,
        subject: str,
        value: Value | None = None,
        *,
        time: datetime | None = None,
        id: str | None = None,
        **dimensions: Dimension,
    ) -> str:
        """Buffer one usage event and return its id; sending happens in the background.

        ``subject`` is the customer; ``time`` defaults to now.  Raises ``BufferFull``
        when the buffer is full (with the default ``overflow="raise"``).  Call it from
        the event loop's thread: the buffer is not locked, because the loop serialises
        access for free.
        """
        event = usage_event(type, subject, value, time=time, id=id, dimensions=dimensions)
        return self.emit_event(event)

    def emit_complete(self, event: dict[str, Any]) -> None:
        """Buffer an event that already has every CloudEvents field, as it is (the
        middleware builds its events whole).  The dict is the client's from now on;
        do not change it."""
        self._emitter.put(event)

    def emit_event(self, event: Mapping[str, Any]) -> str:
        """Buffer a CloudEvent given as a dict; ``specversion``, ``source``, ``id`` and
        ``time`` are filled in when missing.  Returns the event id."""
        full = completed(event, self.source)
        self._emitter.put(full)
        return str(full["id"])

    async def flush(self) -> None:
        """Wait until everything emitted so far is delivered or reported undelivered.

        While Tally is unreachable this waits for it; bound the wait with
        ``asyncio.timeout`` when that matters (``aclose`` does, with ``close_timeout``).
        """
        await self._emitter.flush()

    async def aclose(self) -> None:
        """Flush (for up to ``close_timeout`` seconds) and release the connection pool."""
        try:
            await self._emitter.aclose(self.close_timeout)
        finally:
            self._pool.close()
            self._events_pool.close()

    async def __aenter__(self) -> Tally:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Enforcing ---------------------------------------------------------------------

    async def check(
        self,
        *,
        key: str | None = None,
        customer: str | None = None,
        meter: str = "api_calls",
        endpoint: str | None = None,
        quantity: Decimal | int | str = 1,
        client_ip: str | None = None,
        end_user: str | None = None,
    ) -> Decision:
        """May the customer use ``quantity`` of ``meter`` now?  Nothing is counted.

        ``client_ip`` is the end caller's address, when enforcing on their behalf: Tally
        limits requests and failed key lookups per address, and without it every caller
        of this service would share the service's own address (Tally must list this
        host among its trusted proxies for the address to count).  ``end_user`` is who
        the customer's call is for, which rate limits scoped per end user count.
        """
        body = _enforce_body("check", customer, meter, endpoint, quantity, end_user)
        return await self._enforce(body, key, client_ip)

    async def reserve(
        self,
        event_id: str,
        *,
        key: str | None = None,
        customer: str | None = None,
        meter: str = "api_calls",
        endpoint: str | None = None,
        quantity: Decimal | int | str = 1,
        client_ip: str | None = None,
        end_user: str | None = None,
    ) -> Decision:
        """Like ``check``, but an allowed request is counted at once, so concurrent
        requests cannot all squeeze through the last unit of a limit.  The usage event
        with id ``event_id`` (emitted by this client, so with its ``source``) settles the
        reservation; without it the reservation expires."""
        body = _enforce_body("reserve", customer, meter, endpoint, quantity, end_user)
        body["event"] = {"source": self.source, "id": event_id}
        return await self._enforce(body, key, client_ip)

    async def _enforce(
        self, body: dict[str, Any], key: str | None, client_ip: str | None
    ) -> Decision:
        """One call to ``/v1/enforce``: a customer's key authenticates as that customer,
        else the service token acts for ``body["customer"]``."""
        if key is None and "customer" not in body:
            raise ValueError("pass the caller's API key (key=) or a customer id (customer=)")
        status, headers, answer = await self.post_decision("/v1/enforce", body, key, client_ip)
        if status not in DECISION_STATUSES:
            raise error_of(status, answer, "POST /v1/enforce", "")
        return Decision.from_answer(status, headers, answer or {})

    async def _post_events(self, body: bytes, headers: Mapping[str, str]) -> Reply:
        """One batch to ``/v1/events`` (for the emitter: it retries)."""
        raw = self._enforce_url.batch("/v1/events", body, headers)
        return await self._events_pool.request(raw, self._timeout)

    async def post_decision(
        self, path: str, body: dict[str, Any], key: str | None, client_ip: str | None = None
    ) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        """POST ``body`` to ``path`` over the decisions' pipelined connections: status,
        lower-case headers and the JSON object answered.  For the request path's calls
        (``/v1/enforce``, ``/v1/leases``): they must be safe to send twice."""
        raw = self._enforce_url.request(
            json.dumps(body, separators=(",", ":")), key, client_ip, path
        )
        try:
            reply = await self._pool.request(raw, self.enforce_timeout)
        except (Dropped, TimeoutError) as exc:
            raise unavailable(exc, self.base_url) from exc
        return reply.status, reply.headers, json_object(reply.body)


class _EnforceTarget:
    """Where decisions go, and their requests pre-encoded but for key, address and body."""

    def __init__(self, base_url: str, token: str) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        self.tls = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.tls else 80)
        self._token = token
        self._prefix, self._netloc = url.path, url.netloc
        self._starts: dict[str, str] = {}

    def _start(self, path: str) -> str:
        start = self._starts.get(path)
        if start is None:
            start = self._starts[path] = (
                f"POST {self._prefix}{path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
                "User-Agent: tally-sdk-python\r\nContent-Type: application/json\r\n"
            )
        return start

    def batch(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        """A POST of ``body`` (bytes as they are) with ``headers``, as the service."""
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head = (
            f"POST {self._prefix}{path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
            f"User-Agent: tally-sdk-python\r\n{extra}Authorization: Bearer {self._token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    def request(
        self, body: str, key: str | None, client_ip: str | None, path: str = "/v1/enforce"
    ) -> bytes:
        credential = self._token if key is None else key
        forwarded = "" if client_ip is None else f"X-Forwarded-For: {client_ip}\r\n"
        if _unsafe(credential) or _unsafe(forwarded[:-2]):
            raise ValueError("a key or address with line breaks cannot be sent as a header")
        encoded = body.encode()
        head = (
            f"{self._start(path)}Authorization: Bearer {credential}\r\n{forwarded}"
            f"Content-Length: {len(encoded)}\r\n\r\n"
        )
        return head.encode("latin-1") + encoded


def _unsafe(value: str) -> bool:
    return "\r" in value or "\n" in value


def _enforce_body(
    mode: Mode,
    customer: str | None,
    meter: str,
    endpoint: str | None,
    quantity: Decimal | int | str,
    end_user: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"mode": mode, "meter": meter, "quantity": str(quantity)}
    if customer is not None:
        body["customer"] = customer
    if endpoint is not None:
        body["endpoint"] = endpoint
    if end_user:
        body["end_user"] = end_user
    return body
