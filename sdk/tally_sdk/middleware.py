"""``TallyMiddleware``: limits and metering for an ASGI API in one line.

    app.add_middleware(TallyMiddleware, tally=Tally(url, service_token, source="my-api"))

Each request is decided by Tally *before* the app runs, so a refused caller costs the
app nothing; the caller gets Tally's own answer (status, problem+json, RateLimit and
Retry-After headers), which is what a client library already knows how to read.  An
allowed request reserves its unit up front (``mode="reserve"``), so a burst of
concurrent requests cannot overshoot a limit; the ``api_call`` event emitted after the
response settles it.  Who decides is a ``Decider``: by default ``LeaseDecider``, which
admits most calls in-process from leases (microseconds, no round trip) and tags their
events with the lease id; ``RemoteDecider`` asks Tally for every request.  Leases are
returned and events
batched by the client; on the app's lifespan shutdown the middleware returns the
leases and flushes the events before the server exits, so stopping the app loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from tally_sdk.asgi import ASGIApp, Message, Receive, Scope, Send, send_problem
from tally_sdk.client import Mode, Tally
from tally_sdk.decider import Ask, Decider, RemoteDecider
from tally_sdk.decision import Decision
from tally_sdk.errors import AuthenticationError, InvalidRequest, TallyError
from tally_sdk.events import new_id, now
from tally_sdk.keys import Keys
from tally_sdk.leases import LeaseDecider
from tally_sdk.routes import RouteTemplates, dimension, raw_path

log = logging.getLogger("tally_sdk")

DEFAULT_EXCLUDE = ("/healthz", "/docs", "/redoc", "/openapi.json")
PROBLEMS = "https://tally.dev/problems/"
MALFORMED_JSON = PROBLEMS + "malformed-json"
MISSING_KEY = {
    "type": PROBLEMS + "unauthorized",
    "title": "Unauthorized",
    "status": 401,
    "detail": "send your API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
}
UNAVAILABLE = {
    "type": PROBLEMS + "enforcement-unavailable",
    "title": "Service unavailable",
    "status": 503,
    "detail": "usage limits could not be checked just now; retry shortly",
}
MAX_KEY = 128
"""The longest key sent on to Tally (its keys are 61 characters).  A longer one is
answered here: kept as a lease's name and sent in each lease request, a megabyte key per
request would grow the app's memory and Tally's traffic at its caller's will."""
LONG_KEY = MISSING_KEY | {
    "detail": f"the API key is longer than {MAX_KEY} characters: not a Tally API key"
}
CHALLENGE = {"WWW-Authenticate": "Bearer"}
NOT_A_KEY = MISSING_KEY | {"detail": "not an API key (tally_live_… or tally_test_…)"}
CALLERS_FIELDS = frozenset({"end_user", "body.end_user"})
"""Fields of a decision that come from the caller's request: Tally refusing one (a plan
counting per end user, a request naming none) is the caller's error, answered as Tally
gave it; any other refused field is the app's configuration, handled as Tally being
unable to decide (``fail_open``), so that no caller can turn limits off at will."""

DecideNow = Callable[[str, str, str, str | None], Decision | None]
"""A decider's ``decide_now(key, meter, endpoint, client_ip)``: the decision when it
needs no await (``LeaseDecider``: admitted from a held lease), else ``None``."""


def client_address(scope: Scope) -> str | None:
    """The end user of a request by default: the address it came from."""
    client = scope.get("client")
    return str(client[0]) if client else None


def header(name: str) -> Callable[[Scope], str | None]:
    """The end user as a request header names it (``end_user=header("x-user-id")``)."""
    wanted = name.lower().encode("latin-1")

    def read(scope: Scope) -> str | None:
        for key, value in scope.get("headers") or ():
            if key == wanted:
                text = _text(value)
                return (dimension(text.strip()) or None) if text else None
        return None

    return read


def _text(value: object) -> str | None:
    """A header's value as text; ``None`` for a value ASGI does not allow (a ``str``,
    say), which is ignored like a name of the wrong type rather than failing the call."""
    return value.decode("latin-1") if isinstance(value, _BYTES) else None


_BYTES = (bytes, bytearray)


def _as_tally_takes(endpoint: Callable[[Scope], str]) -> Callable[[Scope], str]:
    """An app's own ``endpoint``, its names cleaned as Tally takes a dimension: one
    built from the raw path would otherwise carry what the caller wrote (``/a%00b``),
    which Tally refuses, and with ``fail_open`` a refused call is served unmetered.
    A name that is not text (``None``, bytes) is the raw path's, with a warning once."""
    warned = False

    def name(scope: Scope) -> str:
        nonlocal warned
        named = endpoint(scope)
        if isinstance(named, str):
            return dimension(named)
        if not warned:
            warned = True
            log.warning("tally: endpoint() gave %r, not a str: the raw path is used", named)
        return raw_path(scope)

    return name


def _unreadable(exc: TallyError) -> bool:
    """Tally could not read the decision's JSON: no caller can cause it (names are
    cleaned first), and if one does the call is refused, not served unmetered."""
    return exc.status == 400 and (exc.problem or {}).get("type") == MALFORMED_JSON


class TallyMiddleware:
    """Enforce Tally's limits on every HTTP request and meter the ones served.

    ``endpoint`` names the endpoint of a request, for leases, per-endpoint policies and
    the event's ``endpoint`` dimension: by default the path template of the route that
    will serve it in a Starlette or FastAPI app (``/v1/items/{item_id}`` for
    ``/v1/items/42``: one lease for all ids), else the raw path (``raw_path``).  ``end_user``
    names who a request is for, for rate limits the plan scopes per end user: the
    client's address by default, or a header (``end_user=header("x-user-id")``).  Paths in
    ``exclude`` (and below them) pass untouched.  When Tally cannot decide — unreachable,
    a 5xx, a misconfigured meter — requests are refused with 503 unless ``fail_open``,
    which serves them unmetered: fail closed by default because an outage of Tally
    should not become free unlimited access.  What a caller sends can never trip that
    setting (``CALLERS_FIELDS``).  ``decider`` replaces who decides (leases
    held in this process by default; ``RemoteDecider(tally)`` asks Tally every time).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tally: Tally,
        meter: str = "api_calls",
        event_type: str = "api_call",
        mode: Mode = "reserve",
        endpoint: Callable[[Scope], str] | None = None,
        end_user: Callable[[Scope], str | None] = client_address,
        exclude: Iterable[str] = DEFAULT_EXCLUDE,
        fail_open: bool = False,
        decider: Decider | None = None,
    ) -> None:
        self.app = app
        self.decider: Decider = decider or (
            LeaseDecider(tally) if mode == "reserve" else RemoteDecider(tally)
        )
        self._decide_now: DecideNow | None = (
            getattr(self.decider, "decide_now", None) if mode == "reserve" else None
        )
        self.tally = tally
        # ``tally.emit_complete``'s own work, bound once: a call less for every request
        self._emit = tally._emitter.put
        self.meter = meter
        self.event_type = event_type
        self.mode = mode
        self.endpoint = endpoint or RouteTemplates()
        # bound methods, called for every request: a call through an instance's
        # ``__call__`` goes the slow way round in CPython
        self._name = (
            self.endpoint.name
            if isinstance(self.endpoint, RouteTemplates)
            else _as_tally_takes(self.endpoint)
        )
        self._key = Keys().read
        self.end_user = end_user
        self.exclude = tuple(p.rstrip("/") for p in exclude)
        self.fail_open = fail_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["path"].startswith(self.exclude) and self._excluded(scope["path"])
        ):
            await self._unmetered(scope, receive, send)
            return
        key = self._key(scope)
        if key is None or len(key) > MAX_KEY:
            problem = MISSING_KEY if key is None else LONG_KEY
            await send_problem(scope, send, 401, problem, CHALLENGE)
            return
        endpoint, event_id = self._name(scope), new_id()
        client = scope.get("client")
        ip = str(client[0]) if client else None
        decision = self._decide_now and self._decide_now(key, self.meter, endpoint, ip)
        if decision is None:  # not settled in this process at once: ask, and wait
            ask = Ask(key, self.meter, endpoint, event_id, self.mode, ip, self._end_user(scope))
            decision = await self._decide(ask, scope, receive, send)
            if decision is None:
                return  # answered already
        if not decision.allowed:
            await send_problem(
                scope, send, decision.status, decision.problem or {}, decision.headers
            )
            return
        # Serve, with the RateLimit headers added, then meter what the app answered.
        # Inline rather than a coroutine of its own: this runs for every request.
        extra = decision.added_headers
        status = 500  # what the server answers if the app fails before responding

        def send_with_limits(message: Message) -> Awaitable[None]:
            # not a coroutine of its own: the server's ``send`` is the one awaited
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), *extra]
            return send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            self._meter(decision, scope, endpoint, event_id, status)

    async def _unmetered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anything but a metered HTTP request: the app's own, the lifespan's shutdown
        held back until leases are returned and events sent."""
        if scope["type"] == "lifespan":
            send = self._flushing_on_shutdown(send)
        await self.app(scope, receive, send)

    async def _decide(
        self, ask: Ask, scope: Scope, receive: Receive, send: Send
    ) -> Decision | None:
        """The decider's answer, or ``None`` once the request is answered without one
        (401 for a key Tally does not know; 503, or served unmetered, when Tally cannot
        decide)."""
        try:
            return await self.decider.decide(ask)
        except AuthenticationError as exc:
            await send_problem(scope, send, 401, exc.problem or MISSING_KEY, CHALLENGE)
        except InvalidRequest as exc:
            fields = {e.get("field") for e in (exc.problem or {}).get("errors") or ()}
            if fields & {"body.customer", "customer"}:  # a service token as the caller's key
                await send_problem(scope, send, 401, NOT_A_KEY, CHALLENGE)
            elif (fields & CALLERS_FIELDS or _unreadable(exc)) and exc.problem and exc.status:
                await send_problem(scope, send, exc.status, exc.problem, {})
            else:
                await self._undecided(exc, scope, receive, send)
        except TallyError as exc:
            await self._undecided(exc, scope, receive, send)
        return None

    def _end_user(self, scope: Scope) -> str | None:
        """Who the request is for, as Tally takes it (``end_user`` may read a header or a
        forwarded address the caller wrote)."""
        found = self.end_user(scope)
        return (dimension(found) or None) if found else None

    def _excluded(self, path: str) -> bool:
        """Whether ``path`` is an excluded path or below one (``__call__`` asks only
        when it starts with one: a single C call settles most requests)."""
        return any(path == p or path.startswith(p + "/") for p in self.exclude)

    def _flushing_on_shutdown(self, send: Send) -> Send:
        """``send`` for the lifespan scope, holding back the app's "shutdown complete"
        until the events still buffered are sent (for up to the client's
        ``close_timeout``): after it the server exits and would take them along."""

        async def flushing(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tally.close_timeout):
                        await self._return_leases()
                        await self.tally.flush()
            await send(message)

        return flushing

    async def _return_leases(self) -> None:
        """Unspent units of leases still held are free for other processes at once."""
        close = getattr(self.decider, "aclose", None)
        if close is not None:
            await close()

    async def _undecided(self, exc: TallyError, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.fail_open:
            log.error("tally: refusing %s, limits could not be checked: %s", scope["path"], exc)
            await send_problem(scope, send, 503, UNAVAILABLE, {"Retry-After": "1"})
            return
        log.warning(
            "tally: serving %s unmetered, limits could not be checked: %s", scope["path"], exc
        )
        await self.app(scope, receive, send)

    def _meter(
        self, decision: Decision, scope: Scope, endpoint: str, event_id: str, status: int
    ) -> None:
        """Emit the usage event; a request already served must not fail because of it.

        The event is built complete here (``emit_event`` would copy it to fill in what
        the wire format needs): this runs for every request served."""
        if decision.customer is None:
            log.error("tally: the decision names no customer; %s not metered", scope["path"])
            return
        event = {
            "specversion": "1.0",
            "source": self.tally.source,
            "id": event_id,
            "type": self.event_type,
            "subject": decision.customer,
            "time": now(),
            "data": {"endpoint": endpoint, "method": str(scope["method"]), "status": status},
        }
        if decision.lease is not None:
            event["tallylease"] = decision.lease  # settles the unit the lease held for it
        try:
            self._emit(event)
        except TallyError as exc:
            log.error("tally: %s %s not metered: %s", scope["method"], scope["path"], exc)
