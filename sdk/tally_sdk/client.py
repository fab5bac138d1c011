"""``Tally``: the async client a metered service keeps for its whole life.

Two jobs with opposite needs share it.  Emitting usage must never slow the caller down,
so ``emit`` only buffers and a background task sends.  Enforcement sits on the request
path and must answer at once, so ``check`` and ``reserve`` call Tally directly, with a
short timeout and no retries — what to do when Tally is unreachable is the caller's
policy (see ``TallyMiddleware``'s ``fail_open``), not the SDK's.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal

import httpx

from tally_sdk.backoff import Backoff
from tally_sdk.buffer import Overflow
from tally_sdk.decision import Decision
from tally_sdk.emitter import Emitter
from tally_sdk.errors import error_for, unavailable
from tally_sdk.events import Dimension, Value, completed, usage_event
from tally_sdk.reports import EmitStats, OnUndelivered, Reporter

Mode = Literal["check", "reserve"]
DECISION_STATUSES = frozenset({200, 403, 429})


class Tally:
    """A client of one Tally deployment.

    ``token`` is a service token: it emits events for any customer and enforces for the
    customer named by ``customer=``.  ``source`` is the CloudEvents source of every event
    this client emits; with the event ids it makes retries idempotent, so keep it stable
    per service (the default is the host name).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        source: str | None = None,
        max_batch: int = 500,
        max_delay: float = 0.5,
        max_buffer: int = 10_000,
        overflow: Overflow = "raise",
        backoff: Backoff | None = None,
        timeout: float = 10.0,
        enforce_timeout: float = 2.0,
        close_timeout: float = 10.0,
        on_undelivered: OnUndelivered | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.source = source or socket.gethostname()
        self.enforce_timeout = enforce_timeout
        self.close_timeout = close_timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "tally-sdk-python"},
            timeout=timeout,
        )
        self._reporter = Reporter(on_undelivered)
        self._emitter = Emitter(
            self._http,
            self._reporter,
            max_buffer=max_buffer,
            overflow=overflow,
            max_batch=max_batch,
            max_delay=max_delay,
            backoff=backoff or Backoff(),
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
            await self._http.aclose()

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
    ) -> Decision:
        """May the customer use ``quantity`` of ``meter`` now?  Nothing is counted.

        ``client_ip`` is the end caller's address, when enforcing on their behalf: Tally
        limits requests and failed key lookups per address, and without it every caller
        of this service would share the service's own address (Tally must list this
        host among its trusted proxies for the address to count).
        """
        body = _enforce_body("check", customer, meter, endpoint, quantity)
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
    ) -> Decision:
        """Like ``check``, but an allowed request is counted at once, so concurrent
        requests cannot all squeeze through the last unit of a limit.  The usage event
        with id ``event_id`` (emitted by this client, so with its ``source``) settles the
        reservation; without it the reservation expires."""
        body = _enforce_body("reserve", customer, meter, endpoint, quantity)
        body["event"] = {"source": self.source, "id": event_id}
        return await self._enforce(body, key, client_ip)

    async def _enforce(
        self, body: dict[str, Any], key: str | None, client_ip: str | None
    ) -> Decision:
        """One call to ``/v1/enforce``: a customer's key authenticates as that customer,
        else the service token acts for ``body["customer"]``."""
        if key is None and "customer" not in body:
            raise ValueError("pass the caller's API key (key=) or a customer id (customer=)")
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        if client_ip is not None:
            headers["X-Forwarded-For"] = client_ip
        try:
            response = await self._http.post(
                "/v1/enforce", json=body, headers=headers, timeout=self.enforce_timeout
            )
        except httpx.TransportError as exc:
            raise unavailable(exc, self.base_url) from exc
        if response.status_code not in DECISION_STATUSES:
            raise error_for(response)
        return Decision.from_response(response)


def _enforce_body(
    mode: Mode,
    customer: str | None,
    meter: str,
    endpoint: str | None,
    quantity: Decimal | int | str,
) -> dict[str, Any]:
    body: dict[str, Any] = {"mode": mode, "meter": meter, "quantity": str(quantity)}
    if customer is not None:
        body["customer"] = customer
    if endpoint is not None:
        body["endpoint"] = endpoint
    return body
