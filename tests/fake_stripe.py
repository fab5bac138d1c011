"""A fake Stripe API for tests: the real ``stripe`` SDK talks HTTP to it on 127.0.0.1.

Stripe cannot be reached from the test machines, and mocking the SDK would hide the bugs
that matter (wire encoding, idempotency keys, retries, error classes).  So the tests run
the real SDK against this stateful in-memory server instead::

    with FakeStripe() as fake:
        client = fake.client(max_network_retries=2)
        # same as: stripe.StripeClient("sk_test_x", max_network_retries=2,
        #              base_addresses={"api": fake.api_base,
        #                              "meter_events": fake.meter_events_base})
        customer = client.v1.customers.create({"email": "a@example.com"})

For the legacy global API set ``stripe.api_base = fake.api_base`` and
``stripe.meter_events_api_base = fake.meter_events_base``.

Two listeners share one state: ``api_base`` (``api.stripe.com``) and ``meter_events_base``
(``meter-events.stripe.com``).  The v2 meter event stream is only served on the second,
everything else only on the first, as in production, so a client that forgets the
``meter_events`` base address fails here too.

Wire formats (from stripe-python's ``_api_requestor``): v1 bodies and all query strings are
``application/x-www-form-urlencoded`` with bracketed keys and indexed lists
(``tiers[0][up_to]=inf``, ``lookup_keys[0]=k``; ``lookup_keys[]=k`` from curl also works);
v2 POST bodies are JSON.  The SDK puts an ``Idempotency-Key`` (a uuid4) on every POST and
reuses it across its own retries.

SDK retry facts (stripe-python ``_http_client.HTTPClient._should_retry``), which is what
tests that inject failures must account for:

* ``StripeClient(max_network_retries=None)`` (the default) makes **no** retries; only the
  legacy global API defaults to ``stripe.max_network_retries = 2``.  Pass
  ``max_network_retries=N`` to the client (or per request in ``options``).
* A ``Stripe-Should-Retry: true|false`` response header decides first.  Otherwise 409 and
  every status >= 500 are retried, and a 429 is **not**.  Stripe sets the header to true
  on ``lock_timeout`` 429s, so ``fail_next(p, 429, code="lock_timeout")`` is retried and a
  plain ``fail_next(p, 429)`` (a real rate limit) surfaces as ``stripe.RateLimitError``.
* Backoff is 0.5 s * 2**(n-1) with jitter, at least 0.5 s, at most 5 s;
  ``Retry-After`` is ignored.  Tests may lower ``stripe._http_client.HTTPClient.INITIAL_DELAY``
  with monkeypatch to keep retries fast.

Meter event rules, from Stripe's API reference: ``timestamp`` within the past 35 days and
at most 5 minutes ahead; ``identifier`` unique within a rolling 24 hours; ``event_name``
must belong to a meter.  A duplicate identifier is **rejected**, not silently dropped:
real Stripe answers ``400 invalid_request_error`` "An event already exists with identifier
X." with ``Stripe-Should-Retry: false`` (seen in production logs quoted in langfuse PR
16292), so callers must treat that answer as "already delivered".  A retry with the same
``Idempotency-Key`` instead replays the stored 200, as Stripe's idempotency layer does.
v1 ``/v1/billing/meter_events`` and v2 ``/v2/billing/meter_events`` validate synchronously
(400 with Stripe's meter error codes, e.g. ``timestamp_too_far_in_past``).  The v2 stream
validates asynchronously in Stripe: it answers 202 and invalid events never bill, so here
they land in ``meter_event_errors`` instead of ``meter_events``.  An unknown customer is
also an asynchronous error in Stripe: the event is accepted (and kept in ``meter_events``)
and a ``meter_event_customer_not_found`` error is noted.  Values must be whole numbers
(Tally only sends integers; Stripe itself is looser).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import secrets
import string
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import parse_qsl, urlsplit

import stripe

if TYPE_CHECKING:
    from types import TracebackType

    from stripe._base_address import BaseAddresses

JSON = dict[str, Any]
Base = Literal["api", "meter_events"]

IDENTIFIER_WINDOW = 24 * 3600
PAST_WINDOW = 35 * 86400
FUTURE_SKEW = 5 * 60
SESSION_TTL = 15 * 60
MAX_STREAM_EVENTS = 100
METADATA_KEYS, METADATA_KEY_LEN, METADATA_VALUE_LEN = 50, 40, 500

# ---------------------------------------------------------------------------------------
# Records


@dataclass
class Recorded:
    """One request as the server saw it, so tests can assert on what the SDK sent."""

    method: str
    path: str
    params: JSON
    headers: dict[str, str]
    base: Base = "api"
    status: int = 0


@dataclass(frozen=True)
class MeterEvent:
    """An accepted meter event; ``via`` says which endpoint took it."""

    event_name: str
    identifier: str
    payload: dict[str, str]
    timestamp: int
    created: int
    via: Literal["v1", "v2", "stream"]


@dataclass(frozen=True)
class MeterEventError:
    """A meter event Stripe would report in ``v1.billing.meter.error_report_triggered``."""

    code: str
    message: str
    event_name: str
    identifier: str | None
    via: Literal["v1", "v2", "stream"]


@dataclass
class _Reply:
    status: int
    body: JSON
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Failure:
    path_prefix: str
    status: int
    remaining: int
    retry_after: int | None
    code: str | None
    should_retry: bool | None
    method: str | None


@dataclass
class _Call:
    base: Base
    method: str
    path: str
    params: JSON
    headers: dict[str, str]
    match: re.Match[str]

    def arg(self, index: int = 1) -> str:
        return self.match.group(index)


class ApiError(Exception):
    """A Stripe-shaped error answer; handlers raise it and the server renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers or {}

    def reply(self) -> _Reply:
        error: JSON = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
        if self.param:
            error["param"] = self.param
        return _Reply(self.status, {"error": error}, dict(self.headers))


# ---------------------------------------------------------------------------------------
# Wire decoding

_BRACKETS = re.compile(r"\[([^\]]*)\]")
# Children of these keys are user-chosen map keys, never list indices.
_MAP_KEYS = frozenset({"metadata", "payload"})


def split_key(key: str) -> list[str]:
    """``tiers[0][up_to]`` -> ``["tiers", "0", "up_to"]``; ``a[]`` -> ``["a", ""]``."""
    head, bracket, _ = key.partition("[")
    if not bracket:
        return [key]
    return [head, *_BRACKETS.findall(key[len(head) :])]


def decode_form(pairs: list[tuple[str, str]]) -> JSON:
    """Rebuild the nested params stripe-python flattened into bracketed form keys."""
    root: JSON = {}
    for key, value in pairs:
        _assign(root, split_key(key), value)
    decoded = _listify(root, "")
    assert isinstance(decoded, dict)
    return decoded


def _assign(node: JSON, parts: list[str], value: str) -> None:
    for part in parts[:-1]:
        name = part or str(len(node))
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
    node[parts[-1] or str(len(node))] = value


def _listify(value: Any, key: str) -> Any:
    """Turn dicts keyed ``"0", "1", ...`` into lists, except user maps like metadata."""
    if not isinstance(value, dict):
        return value
    items = {k: _listify(v, k) for k, v in value.items()}
    if key not in _MAP_KEYS and items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def _decode_params(query: str, raw: bytes, content_type: str) -> JSON:
    params = decode_form(parse_qsl(query, keep_blank_values=True))
    if not raw:
        return params
    if content_type.startswith("application/json"):
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("the JSON body must be an object")
        return {**params, **body}
    form = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
    return {**params, **decode_form(form)}


# ---------------------------------------------------------------------------------------
# Small helpers for params and objects

_ALPHABET = string.ascii_letters + string.digits


def _token(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_id(prefix: str, length: int = 24) -> str:
    """A Stripe-looking id such as ``cus_Q3x...``."""
    return f"{prefix}_{_token(length)}"


def _iso(ts: float) -> str:
    """v2 timestamps are RFC 3339 strings with milliseconds and a Z."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _missing(param: str) -> ApiError:
    return ApiError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="parameter_invalid", param=param)


def _no_such(kind: str, ident: str, param: str = "id", status: int = 404) -> ApiError:
    return ApiError(status, f"No such {kind}: '{ident}'", code="resource_missing", param=param)


def _check_known(params: JSON, allowed: set[str], prefix: str = "") -> None:
    """Stripe refuses unknown params, which catches typos such as ``tier_mode``."""
    for key in params:
        if key not in allowed and key != "expand":
            name = f"{prefix}[{key}]" if prefix else key
            raise ApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


def _str(params: JSON, name: str, *, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str):
        raise _invalid(name, f"Invalid string: {value!r}")
    return value


def _required(params: JSON, name: str) -> str:
    value = _str(params, name, required=True)
    assert value is not None
    return value


def _dict(params: JSON, name: str) -> JSON:
    value = params.get(name, {})
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise _invalid(name, f"Invalid object: {name} must be a hash")
    return value


def _bool(params: JSON, name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if value in (True, "true"):
        return True
    if value in (False, "false"):
        return False
    raise _invalid(name, f"Invalid boolean: {value}")


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise _invalid(name, f"Invalid integer: {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise _invalid(name, f"Invalid integer: {value}")


def _decimal(value: Any, name: str) -> Decimal:
    """Stripe's ``*_decimal`` amounts: non-negative, at most 12 decimal places."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise _invalid(name, f"Invalid decimal: {value}") from None
    if not amount.is_finite() or amount < 0:
        raise _invalid(name, f"Invalid decimal: {value}")
    if -amount.as_tuple().exponent > 12:  # type: ignore[operator]
        raise _invalid(name, f"Invalid decimal: {value} has more than 12 decimal places")
    return amount


def _decimal_str(amount: Decimal) -> str:
    return format(amount.normalize(), "f")


def _whole(amount: Decimal) -> int | None:
    """The integer ``unit_amount`` Stripe reports beside a decimal, or None if fractional."""
    return int(amount) if amount == amount.to_integral_value() else None


def _apply_metadata(current: dict[str, str], update: Any) -> dict[str, str]:
    """Stripe merges metadata; an empty string value deletes that key."""
    if update is None:
        return current
    if update == "":
        return {}
    if not isinstance(update, dict):
        raise _invalid("metadata", "Invalid object: metadata must be a hash")
    merged = dict(current)
    for key, value in update.items():
        if len(key) > METADATA_KEY_LEN:
            raise _invalid(f"metadata[{key}]", f"Metadata keys can be {METADATA_KEY_LEN} long")
        if not isinstance(value, str) or len(value) > METADATA_VALUE_LEN:
            raise _invalid(f"metadata[{key}]", "Metadata values must be short strings")
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    if len(merged) > METADATA_KEYS:
        raise _invalid("metadata", f"Metadata can have at most {METADATA_KEYS} keys")
    return merged


def _expands(params: JSON) -> set[str]:
    value = params.get("expand", [])
    return set(value if isinstance(value, list) else [value])


# ---------------------------------------------------------------------------------------
# Webhooks


def sign_webhook(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header value: ``t=...,v1=HMAC-SHA256(secret, "t.payload")``."""
    signed_at = int(time.time()) if timestamp is None else timestamp
    signed = f"{signed_at}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={signed_at},v1={digest}"


def webhook_event(type: str, obj: JSON, id: str | None = None, created: int | None = None) -> bytes:
    """The JSON body of a snapshot event as Stripe posts it to a webhook endpoint."""
    event = {
        "id": id or new_id("evt"),
        "object": "event",
        "api_version": stripe.api_version,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type,
    }
    return json.dumps(event).encode()


# ---------------------------------------------------------------------------------------
# The server

Handler = Callable[[_Call], "JSON | _Reply"]


class FakeStripe:
    """Stateful fake of the Stripe endpoints Tally uses; see the module docstring."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        """``clock`` lets tests move time for the 24 h identifier and 35-day windows."""
        self.clock = clock
        self.requests: list[Recorded] = []
        self.meter_events: list[MeterEvent] = []
        self.meter_event_errors: list[MeterEventError] = []
        self.cancelled_meter_events: list[MeterEvent] = []
        self.customers: dict[str, JSON] = {}
        self.products: dict[str, JSON] = {}
        self.prices: dict[str, JSON] = {}  # stored with "tiers"; answers hide them unexpanded
        self.meters: dict[str, JSON] = {}
        self.checkout_sessions: dict[str, JSON] = {}
        self.portal_sessions: dict[str, JSON] = {}
        self.invoices: dict[str, JSON] = {}  # made by tests (``add_invoice``), as Stripe bills
        self.invoice_items: dict[str, JSON] = {}
        self.credit_notes: dict[str, JSON] = {}
        self._sessions: dict[str, float] = {}  # meter event session token -> expires at
        self._identifiers: dict[str, float] = {}  # meter event identifier -> accepted at
        self._idempotent: dict[tuple[Base, str], tuple[tuple[str, str, str], _Reply]] = {}
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._servers: dict[Base, ThreadingHTTPServer] = {}
        self._threads: list[threading.Thread] = []
        self._routes = self._route_table()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeStripe:
        for base in ("api", "meter_events"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self, base))
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._servers[base] = server
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _url(self, base: Base) -> str:
        host, port = self._servers[base].server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def api_base(self) -> str:
        """Stands in for ``https://api.stripe.com``."""
        return self._url("api")

    @property
    def meter_events_base(self) -> str:
        """Stands in for ``https://meter-events.stripe.com`` (the v2 event stream)."""
        return self._url("meter_events")

    @property
    def base_addresses(self) -> dict[str, str]:
        """Ready for ``StripeClient(..., base_addresses=fake.base_addresses)``."""
        return {"api": self.api_base, "meter_events": self.meter_events_base}

    def client(
        self, api_key: str = "sk_test_tally", *, max_network_retries: int = 0
    ) -> stripe.StripeClient:
        """A real SDK client aimed at this fake."""
        return stripe.StripeClient(
            api_key,
            base_addresses=cast("BaseAddresses", self.base_addresses),
            max_network_retries=max_network_retries,
        )

    # -- test controls -------------------------------------------------------------------

    def fail_next(
        self,
        path_prefix: str,
        status: int,
        count: int = 1,
        retry_after: int | None = None,
        *,
        code: str | None = None,
        should_retry: bool | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with a Stripe-shaped error.

        Injected failures happen before idempotency and are never stored, so the SDK's
        retry (same Idempotency-Key) then succeeds.  ``should_retry`` sets the
        ``Stripe-Should-Retry`` header; by default it is sent (true) only for a 429 with
        ``code="lock_timeout"``, mirroring Stripe.
        """
        if should_retry is None and status == 429 and code == "lock_timeout":
            should_retry = True
        with self._lock:
            self._failures.append(
                _Failure(path_prefix, status, count, retry_after, code, should_retry, method)
            )

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[Recorded]:
        """The recorded requests whose path starts with ``path_prefix``."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.startswith(path_prefix) and method in (None, r.method)
            ]

    def expire_meter_event_sessions(self) -> None:
        """Make every v2 session token stale, to test the client's token refresh."""
        with self._lock:
            self._sessions = dict.fromkeys(self._sessions, 0.0)

    def meter_total(self, event_name: str, customer: str) -> Decimal:
        """What the meter would bill ``customer``, using the meter's formula."""
        with self._lock:
            return self._meter_total(event_name, customer)

    def _meter_total(self, event_name: str, customer: str) -> Decimal:
        meter = self._meter_by_event_name(event_name)
        if meter is None:
            raise KeyError(event_name)
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        events = [
            e
            for e in self.meter_events
            if e.event_name == event_name and e.payload.get(customer_key) == customer
        ]
        formula = meter["default_aggregation"]["formula"]
        if formula == "count":
            return Decimal(len(events))
        if formula == "last":
            latest = max(events, key=lambda e: (e.timestamp, e.created), default=None)
            return Decimal(latest.payload[value_key]) if latest else Decimal(0)
        return sum((Decimal(e.payload[value_key]) for e in events), Decimal(0))

    # -- request pipeline ----------------------------------------------------------------

    def handle(
        self, base: Base, method: str, target: str, headers: dict[str, str], raw: bytes
    ) -> _Reply:
        """Record, then answer one request (called from the HTTP handler threads)."""
        split = urlsplit(target)
        decode_error: ApiError | None = None
        try:
            params = _decode_params(split.query, raw, headers.get("content-type", ""))
        except (ValueError, UnicodeDecodeError) as exc:
            params, decode_error = {}, ApiError(400, f"Invalid request body: {exc}")
        with self._lock:
            record = Recorded(method, split.path, params, headers, base)
            self.requests.append(record)
            try:
                if decode_error is not None:
                    raise decode_error
                reply = self._respond(base, method, split.path, params, headers)
            except ApiError as exc:
                reply = exc.reply()
            record.status = reply.status
        reply.headers.setdefault("Request-Id", new_id("req", 14))
        if "idempotency-key" in headers:
            reply.headers.setdefault("Idempotency-Key", headers["idempotency-key"])
        return reply

    def _respond(
        self, base: Base, method: str, path: str, params: JSON, headers: dict[str, str]
    ) -> _Reply:
        injected = self._take_failure(method, path)
        if injected is not None:
            return injected
        self._authenticate(base, path, headers)
        key = headers.get("idempotency-key")
        if method != "POST" or not key:
            return self._dispatch(base, method, path, params, headers)
        fingerprint = (method, path, json.dumps(params, sort_keys=True))
        stored = self._idempotent.get((base, key))
        if stored is not None:
            if stored[0] != fingerprint:
                raise ApiError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    f"they were first used with. Try using a key other than '{key}' if you "
                    "meant to execute a different request.",
                    type="idempotency_error",
                )
            replay = stored[1]
            headers_out = {**replay.headers, "Idempotent-Replayed": "true"}
            return _Reply(replay.status, replay.body, headers_out)
        reply = self._dispatch(base, method, path, params, headers)
        if 200 <= reply.status < 300:  # failed validation is not saved, as in Stripe
            self._idempotent[(base, key)] = (fingerprint, reply)
        return reply

    def _take_failure(self, method: str, path: str) -> _Reply | None:
        for failure in self._failures:
            if path.startswith(failure.path_prefix) and failure.method in (None, method):
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return _failure_reply(failure)
        return None

    def _authenticate(self, base: Base, path: str, headers: dict[str, str]) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth.",
            )
        if base == "meter_events":
            expires = self._sessions.get(token)
            if expires is None:
                raise ApiError(401, "Invalid meter event session token provided.")
            if expires <= self.clock():
                raise ApiError(
                    401,
                    "The meter event session has expired. Create a new session.",
                    type="temporary_session_expired",
                    code="billing_meter_event_session_expired",
                )
        elif not token.startswith(("sk_test_", "rk_test_")):
            raise ApiError(401, f"Invalid API Key provided: {token[:8]}***")

    def _dispatch(
        self, base: Base, method: str, path: str, params: JSON, headers: dict[str, str]
    ) -> _Reply:
        for route_method, route_base, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match and route_method == method and route_base == base:
                result = handler(_Call(base, method, path, params, headers, match))
                return result if isinstance(result, _Reply) else _Reply(200, result)
        raise ApiError(404, f"Unrecognized request URL ({method}: {path}).")

    def _route_table(self) -> list[tuple[str, Base, re.Pattern[str], Handler]]:
        ident = r"([A-Za-z0-9_\-]+)"
        table: list[tuple[str, Base, str, Handler]] = [
            ("POST", "api", "/v1/customers", self._create_customer),
            ("GET", "api", f"/v1/customers/{ident}", self._get_customer),
            ("POST", "api", f"/v1/customers/{ident}", self._update_customer),
            ("POST", "api", "/v1/products", self._create_product),
            ("GET", "api", f"/v1/products/{ident}", self._get_product),
            ("POST", "api", f"/v1/products/{ident}", self._update_product),
            ("POST", "api", "/v1/prices", self._create_price),
            ("GET", "api", "/v1/prices", self._list_prices),
            ("GET", "api", f"/v1/prices/{ident}", self._get_price),
            ("POST", "api", f"/v1/prices/{ident}", self._update_price),
            ("POST", "api", "/v1/billing/meters", self._create_meter),
            ("GET", "api", "/v1/billing/meters", self._list_meters),
            ("GET", "api", f"/v1/billing/meters/{ident}", self._get_meter),
            ("POST", "api", f"/v1/billing/meters/{ident}/deactivate", self._deactivate_meter),
            ("POST", "api", f"/v1/billing/meters/{ident}/reactivate", self._reactivate_meter),
            ("POST", "api", "/v1/billing/meter_events", self._create_meter_event_v1),
            ("POST", "api", "/v2/billing/meter_events", self._create_meter_event_v2),
            ("POST", "api", "/v2/billing/meter_event_session", self._create_session),
            ("POST", "meter_events", "/v2/billing/meter_event_stream", self._stream),
            ("POST", "api", "/v1/checkout/sessions", self._create_checkout),
            ("GET", "api", f"/v1/checkout/sessions/{ident}", self._get_checkout),
            ("POST", "api", "/v1/billing_portal/sessions", self._create_portal),
            ("POST", "api", "/v1/billing/meter_event_adjustments", self._adjust_meter_event),
            ("POST", "api", "/v1/invoiceitems", self._create_invoice_item),
            ("POST", "api", "/v1/credit_notes", self._create_credit_note),
        ]
        return [(m, b, re.compile(p), h) for m, b, p, h in table]

    # -- shared object helpers -----------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _base_object(self, prefix: str, object_name: str) -> JSON:
        return {
            "id": new_id(prefix, 14),
            "object": object_name,
            "created": self._now(),
            "livemode": False,
        }

    @staticmethod
    def _get(collection: dict[str, JSON], kind: str, ident: str) -> JSON:
        if ident not in collection:
            raise _no_such(kind, ident)
        return collection[ident]

    @staticmethod
    def _list(items: list[JSON], params: JSON, url: str) -> JSON:
        """A Stripe list page: newest first, ``limit`` (default 10), ``starting_after``."""
        limit = _int(params.get("limit", 10), "limit")
        if not 1 <= limit <= 100:
            raise _invalid("limit", "limit must be between 1 and 100")
        ordered = sorted(items, key=lambda o: o["created"], reverse=True)
        after = params.get("starting_after")
        if after:
            ids = [o["id"] for o in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        return {
            "object": "list",
            "data": ordered[:limit],
            "has_more": len(ordered) > limit,
            "url": url,
        }

    # -- customers -----------------------------------------------------------------------

    def _create_customer(self, call: _Call) -> JSON:
        p = call.params
        email = _str(p, "email")
        if email is not None and "@" not in email:
            raise _invalid("email", f"Invalid email address: {email}")
        customer = {
            **self._base_object("cus", "customer"),
            "address": None,
            "balance": 0,
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": _str(p, "description"),
            "email": email,
            "invoice_prefix": _token(8).upper(),
            "metadata": _apply_metadata({}, p.get("metadata")),
            "name": _str(p, "name"),
            "phone": _str(p, "phone"),
            "preferred_locales": [],
            "tax_exempt": "none",
        }
        self.customers[customer["id"]] = customer
        return customer

    def _get_customer(self, call: _Call) -> JSON:
        return self._get(self.customers, "customer", call.arg())

    def _update_customer(self, call: _Call) -> JSON:
        customer = self._get(self.customers, "customer", call.arg())
        for name in ("email", "name", "description", "phone"):
            if name in call.params:
                customer[name] = _str(call.params, name)
        customer["metadata"] = _apply_metadata(customer["metadata"], call.params.get("metadata"))
        return customer

    # -- products ------------------------------------------------------------------------

    _PRODUCT_PARAMS: frozenset[str] = frozenset(
        {"name", "id", "active", "description", "metadata", "statement_descriptor"}
        | {"tax_code", "unit_label", "url", "images", "marketing_features"}
    )

    def _create_product(self, call: _Call) -> JSON:
        p = call.params
        _check_known(p, set(self._PRODUCT_PARAMS))
        product = {
            **self._base_object("prod", "product"),
            "active": _bool(p, "active") is not False,
            "default_price": None,
            "description": _str(p, "description"),
            "images": [],
            "metadata": _apply_metadata({}, p.get("metadata")),
            "name": _required(p, "name"),
            "tax_code": _str(p, "tax_code"),
            "unit_label": _str(p, "unit_label"),
            "updated": self._now(),
            "url": _str(p, "url"),
        }
        custom_id = _str(p, "id")
        if custom_id is not None:
            if custom_id in self.products:
                raise ApiError(
                    400, "Product already exists.", code="resource_already_exists", param="id"
                )
            product["id"] = custom_id
        self.products[product["id"]] = product
        return product

    def _get_product(self, call: _Call) -> JSON:
        return self._get(self.products, "product", call.arg())

    def _update_product(self, call: _Call) -> JSON:
        product = self._get(self.products, "product", call.arg())
        p = call.params
        _check_known(p, set(self._PRODUCT_PARAMS - {"id"}) | {"default_price"})
        for name in ("name", "description", "unit_label", "url", "tax_code", "default_price"):
            if name in p:
                product[name] = _str(p, name)
        active = _bool(p, "active")
        if active is not None:
            product["active"] = active
        product["metadata"] = _apply_metadata(product["metadata"], p.get("metadata"))
        product["updated"] = self._now()
        return product

    # -- prices --------------------------------------------------------------------------

    _PRICE_PARAMS: frozenset[str] = frozenset(
        {"product", "currency", "unit_amount", "unit_amount_decimal", "recurring"}
        | {"billing_scheme", "tiers_mode", "tiers", "lookup_key", "transfer_lookup_key"}
        | {"metadata", "nickname", "active", "tax_behavior", "transform_quantity"}
    )

    def _create_price(self, call: _Call) -> JSON:
        p = call.params
        _check_known(p, set(self._PRICE_PARAMS))
        product = _required(p, "product")
        if product not in self.products:
            raise _no_such("product", product, "product", 400)
        currency = _required(p, "currency").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise _invalid("currency", f"Invalid currency: {currency}")
        scheme = _str(p, "billing_scheme") or "per_unit"
        if scheme not in ("per_unit", "tiered"):
            raise _invalid("billing_scheme", f"Invalid billing_scheme: {scheme}")
        recurring = self._recurring(p)
        price = {
            **self._base_object("price", "price"),
            "active": _bool(p, "active") is not False,
            "billing_scheme": scheme,
            "currency": currency,
            "custom_unit_amount": None,
            "lookup_key": None,
            "metadata": _apply_metadata({}, p.get("metadata")),
            "nickname": _str(p, "nickname"),
            "product": product,
            "recurring": recurring,
            "tax_behavior": _str(p, "tax_behavior") or "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring" if recurring else "one_time",
            "unit_amount": None,
            "unit_amount_decimal": None,
        }
        price["id"] = new_id("price", 24)
        if scheme == "tiered":
            self._apply_tiers(price, p)
        else:
            self._apply_unit_amount(price, p)
        price["transform_quantity"] = self._transform_quantity(p, scheme)
        self._claim_lookup_key(price, _str(p, "lookup_key"), _bool(p, "transfer_lookup_key"))
        self.prices[price["id"]] = price
        return self._render_price(price, _expands(p))

    def _recurring(self, p: JSON) -> JSON | None:
        if "recurring" not in p:
            return None
        raw = _dict(p, "recurring")
        allowed = {"interval", "interval_count", "usage_type", "meter", "trial_period_days"}
        _check_known(raw, allowed, "recurring")
        interval = _str(raw, "interval")
        if interval is None:
            raise _missing("recurring[interval]")
        if interval not in ("day", "week", "month", "year"):
            raise _invalid("recurring[interval]", f"Invalid interval: {interval}")
        usage_type = _str(raw, "usage_type") or "licensed"
        if usage_type not in ("licensed", "metered"):
            raise _invalid("recurring[usage_type]", f"Invalid usage_type: {usage_type}")
        meter = _str(raw, "meter")
        if usage_type == "metered" and meter is None:
            raise _invalid(
                "recurring[meter]",
                "Metered prices must be backed by a meter: pass recurring[meter].",
            )
        if meter is not None and meter not in self.meters:
            raise _no_such("billing.meter", meter, "recurring[meter]", 400)
        count = raw.get("interval_count")
        return {
            "interval": interval,
            "interval_count": _int(count, "recurring[interval_count]") if count else 1,
            "meter": meter,
            "trial_period_days": None,
            "usage_type": usage_type,
        }

    @staticmethod
    def _transform_quantity(p: JSON, scheme: str) -> JSON | None:
        if "transform_quantity" not in p:
            return None
        if scheme == "tiered":
            raise _invalid("transform_quantity", "transform_quantity needs per_unit pricing.")
        raw = _dict(p, "transform_quantity")
        _check_known(raw, {"divide_by", "round"}, "transform_quantity")
        if "divide_by" not in raw:
            raise _missing("transform_quantity[divide_by]")
        divide_by = _int(raw["divide_by"], "transform_quantity[divide_by]")
        if divide_by < 1:
            raise _invalid("transform_quantity[divide_by]", "divide_by must be positive.")
        rounding = _str(raw, "round")
        if rounding not in ("up", "down"):
            raise _invalid("transform_quantity[round]", "round must be up or down.")
        return {"divide_by": divide_by, "round": rounding}

    def _apply_unit_amount(self, price: JSON, p: JSON) -> None:
        if "tiers" in p or "tiers_mode" in p:
            raise _invalid("tiers", "tiers and tiers_mode need billing_scheme=tiered.")
        if "unit_amount" in p and "unit_amount_decimal" in p:
            raise _invalid("unit_amount", "Pass only one of unit_amount and unit_amount_decimal.")
        if "unit_amount" in p:
            amount = Decimal(_int(p["unit_amount"], "unit_amount"))
        elif "unit_amount_decimal" in p:
            amount = _decimal(p["unit_amount_decimal"], "unit_amount_decimal")
        else:
            raise _missing("unit_amount")
        price["unit_amount"] = _whole(amount)
        price["unit_amount_decimal"] = _decimal_str(amount)

    def _apply_tiers(self, price: JSON, p: JSON) -> None:
        if "unit_amount" in p or "unit_amount_decimal" in p:
            raise _invalid("unit_amount", "Tiered prices take their amounts from tiers.")
        if price["recurring"] is None:
            raise _invalid(
                "billing_scheme", "Tiered pricing is only supported for recurring prices."
            )
        mode = _str(p, "tiers_mode")
        if mode is None:
            raise _missing("tiers_mode")
        if mode not in ("graduated", "volume"):
            raise _invalid("tiers_mode", f"Invalid tiers_mode: {mode}")
        raw = p.get("tiers")
        if not isinstance(raw, list) or not raw:
            raise _missing("tiers")
        tiers = [self._tier(i, t) for i, t in enumerate(raw)]
        bounds = [t["up_to"] for t in tiers]
        if bounds[-1] is not None or None in bounds[:-1]:
            raise _invalid("tiers", "Only the last tier may (and must) have up_to=inf.")
        finite = [b for b in bounds if b is not None]
        if any(b <= a for a, b in itertools.pairwise(finite)) or min(finite, default=1) < 1:
            raise _invalid("tiers", "Tier up_to values must be positive and increasing.")
        price["tiers_mode"], price["tiers"] = mode, tiers

    @staticmethod
    def _tier(index: int, raw: Any) -> JSON:
        name = f"tiers[{index}]"
        if not isinstance(raw, dict):
            raise _invalid(name, f"Invalid object: {name}")
        allowed = {"up_to", "unit_amount", "unit_amount_decimal", "flat_amount"}
        _check_known(raw, allowed | {"flat_amount_decimal"}, name)
        up_to = raw.get("up_to")
        if up_to is None:
            raise _missing(f"{name}[up_to]")
        tier: JSON = {"up_to": None if up_to == "inf" else _int(up_to, f"{name}[up_to]")}
        for kind in ("unit_amount", "flat_amount"):
            amount: Decimal | None = None
            if kind in raw:
                amount = Decimal(_int(raw[kind], f"{name}[{kind}]"))
            if f"{kind}_decimal" in raw:
                amount = _decimal(raw[f"{kind}_decimal"], f"{name}[{kind}_decimal]")
            tier[kind] = None if amount is None else _whole(amount)
            tier[f"{kind}_decimal"] = None if amount is None else _decimal_str(amount)
        if tier["unit_amount_decimal"] is None and tier["flat_amount_decimal"] is None:
            raise _missing(f"{name}[unit_amount_decimal]")
        return tier

    def _claim_lookup_key(self, price: JSON, key: str | None, transfer: bool | None) -> None:
        """Stripe keeps lookup keys unique; ``transfer_lookup_key`` moves one over."""
        if key is None:
            return
        for other in self.prices.values():
            if other["lookup_key"] == key and other["id"] != price["id"]:
                if not transfer:
                    raise ApiError(
                        400,
                        f"A price (`{other['id']}`) already uses that lookup key.",
                        param="lookup_key",
                    )
                other["lookup_key"] = None
        price["lookup_key"] = key

    @staticmethod
    def _render_price(price: JSON, expand: set[str]) -> JSON:
        """Like Stripe, ``tiers`` is only in the answer when expanded."""
        if "tiers" in expand or "data.tiers" in expand:
            return price
        return {k: v for k, v in price.items() if k != "tiers"}

    def _get_price(self, call: _Call) -> JSON:
        price = self._get(self.prices, "price", call.arg())
        return self._render_price(price, _expands(call.params))

    def _update_price(self, call: _Call) -> JSON:
        price = self._get(self.prices, "price", call.arg())
        p = call.params
        allowed = {"active", "metadata", "nickname", "lookup_key", "transfer_lookup_key"}
        _check_known(p, allowed | {"tax_behavior"})
        active = _bool(p, "active")
        if active is not None:
            price["active"] = active
        if "nickname" in p:
            price["nickname"] = _str(p, "nickname")
        if "lookup_key" in p:
            self._claim_lookup_key(price, _str(p, "lookup_key"), _bool(p, "transfer_lookup_key"))
        price["metadata"] = _apply_metadata(price["metadata"], p.get("metadata"))
        return self._render_price(price, _expands(p))

    def _list_prices(self, call: _Call) -> JSON:
        p = call.params
        prices = list(self.prices.values())
        keys = p.get("lookup_keys")
        if keys is not None:
            wanted = set(keys if isinstance(keys, list) else [keys])
            prices = [x for x in prices if x["lookup_key"] in wanted]
        active = _bool(p, "active")
        if active is not None:
            prices = [x for x in prices if x["active"] is active]
        if "product" in p:
            prices = [x for x in prices if x["product"] == p["product"]]
        if "type" in p:
            prices = [x for x in prices if x["type"] == p["type"]]
        page = self._list(prices, p, "/v1/prices")
        page["data"] = [self._render_price(x, _expands(p)) for x in page["data"]]
        return page

    # -- meters --------------------------------------------------------------------------

    def _create_meter(self, call: _Call) -> JSON:
        p = call.params
        allowed = {"display_name", "event_name", "default_aggregation", "customer_mapping"}
        _check_known(p, allowed | {"value_settings", "event_time_window"})
        event_name = _required(p, "event_name")
        if len(event_name) > 100:
            raise _invalid("event_name", "event_name can be at most 100 characters")
        if self._meter_by_event_name(event_name) is not None:
            raise ApiError(
                400,
                f"A meter with event_name `{event_name}` already exists.",
                code="resource_already_exists",
                param="event_name",
            )
        formula = _dict(p, "default_aggregation").get("formula")
        if formula is None:
            raise _missing("default_aggregation[formula]")
        if formula not in ("sum", "count", "last"):
            raise _invalid("default_aggregation[formula]", f"Invalid formula: {formula}")
        mapping = _dict(p, "customer_mapping")
        if mapping.get("type", "by_id") != "by_id":
            raise _invalid("customer_mapping[type]", "customer_mapping[type] must be by_id")
        meter = {
            **self._base_object("mtr_test", "billing.meter"),
            "customer_mapping": {
                "event_payload_key": mapping.get("event_payload_key", "stripe_customer_id"),
                "type": "by_id",
            },
            "default_aggregation": {"formula": formula},
            "display_name": _required(p, "display_name"),
            "event_name": event_name,
            "event_time_window": _str(p, "event_time_window"),
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": self._now(),
            "value_settings": {
                "event_payload_key": _dict(p, "value_settings").get("event_payload_key", "value")
            },
        }
        self.meters[meter["id"]] = meter
        return meter

    def _meter_by_event_name(self, event_name: str) -> JSON | None:
        return next((m for m in self.meters.values() if m["event_name"] == event_name), None)

    def _list_meters(self, call: _Call) -> JSON:
        meters = list(self.meters.values())
        status = call.params.get("status")
        if status is not None:
            meters = [m for m in meters if m["status"] == status]
        return self._list(meters, call.params, "/v1/billing/meters")

    def _get_meter(self, call: _Call) -> JSON:
        return self._get(self.meters, "billing.meter", call.arg())

    def _set_meter_status(self, call: _Call, status: str) -> JSON:
        meter = self._get(self.meters, "billing.meter", call.arg())
        meter["status"] = status
        deactivated = self._now() if status == "inactive" else None
        meter["status_transitions"] = {"deactivated_at": deactivated}
        meter["updated"] = self._now()
        return meter

    def _deactivate_meter(self, call: _Call) -> JSON:
        return self._set_meter_status(call, "inactive")

    def _reactivate_meter(self, call: _Call) -> JSON:
        return self._set_meter_status(call, "active")

    # -- meter events --------------------------------------------------------------------

    def _create_meter_event_v1(self, call: _Call) -> JSON:
        p = call.params
        _check_known(p, {"event_name", "payload", "identifier", "timestamp"})
        stamp = p.get("timestamp")
        timestamp = self._now() if stamp in (None, "") else _int(stamp, "timestamp")
        event = self._accept_event(p, timestamp, "v1")
        return {
            "object": "billing.meter_event",
            "created": event.created,
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": False,
            "payload": event.payload,
            "timestamp": event.timestamp,
        }

    def _create_meter_event_v2(self, call: _Call) -> JSON:
        p = call.params
        _check_known(p, {"event_name", "payload", "identifier", "timestamp"})
        event = self._accept_event(p, self._v2_timestamp(p.get("timestamp")), "v2")
        return self._v2_event(event)

    @staticmethod
    def _v2_event(event: MeterEvent) -> JSON:
        return {
            "object": "v2.billing.meter_event",
            "created": _iso(event.created),
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": False,
            "payload": event.payload,
            "timestamp": _iso(event.timestamp),
        }

    def _v2_timestamp(self, raw: Any) -> int:
        if raw in (None, ""):
            return self._now()
        if not isinstance(raw, str):
            raise _invalid("timestamp", "timestamp must be an RFC 3339 date-time string")
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise _invalid("timestamp", f"Invalid timestamp: {raw}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp())

    def _accept_event(
        self, p: JSON, timestamp: int, via: Literal["v1", "v2", "stream"]
    ) -> MeterEvent:
        """Validate like Stripe, then store; raises ApiError(400) when Stripe would."""
        event_name = _required(p, "event_name")
        payload = p.get("payload")
        if not isinstance(payload, dict) or not payload:
            raise _missing("payload")
        if not all(isinstance(v, str) for v in payload.values()):
            raise _invalid("payload", "Payload values must be strings.")
        identifier = _str(p, "identifier") or str(uuid.uuid4())
        if len(identifier) > 100:
            raise _invalid("identifier", "identifier can be at most 100 characters")
        meter = self._check_event(event_name, payload, timestamp)
        now = self.clock()
        seen = self._identifiers.get(identifier)
        if seen is not None and now - seen < IDENTIFIER_WINDOW:
            raise ApiError(
                400,
                f"An event already exists with identifier {identifier}.",
                param="identifier",
                headers={"Stripe-Should-Retry": "false"},
            )
        self._identifiers[identifier] = now
        event = MeterEvent(event_name, identifier, dict(payload), timestamp, int(now), via)
        self.meter_events.append(event)
        customer = payload[meter["customer_mapping"]["event_payload_key"]]
        if customer not in self.customers:
            self.meter_event_errors.append(
                MeterEventError(
                    "meter_event_customer_not_found",
                    f"No customer {customer} for meter event {identifier}",
                    event_name,
                    identifier,
                    via,
                )
            )
        return event

    def _adjust_meter_event(self, call: _Call) -> JSON:
        """Cancel an event by identifier: only within 24 hours of Stripe taking it."""
        p = call.params
        _check_known(p, {"event_name", "type", "cancel"})
        event_name = _required(p, "event_name")
        if _str(p, "type") not in (None, "cancel"):
            raise _invalid("type", "type must be cancel")
        cancel = _dict(p, "cancel")
        _check_known(cancel, {"identifier"}, "cancel")
        identifier = _required(cancel, "identifier")
        found = [
            e
            for e in self.meter_events
            if e.identifier == identifier and e.event_name == event_name
        ]
        if not found:
            raise _no_such("meter event", identifier, "cancel[identifier]", status=400)
        if self.clock() - self._identifiers.get(identifier, 0) > IDENTIFIER_WINDOW:
            raise _invalid(
                "cancel[identifier]",
                f"Meter event {identifier} can no longer be cancelled: events can be"
                " cancelled within 24 hours of being received.",
            )
        self.meter_events = [e for e in self.meter_events if e not in found]
        self.cancelled_meter_events += found
        return {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }

    def _check_event(self, event_name: str, payload: JSON, timestamp: int) -> JSON:
        """The checks Stripe makes on every event, as ApiErrors with its meter codes."""
        meter = self._meter_by_event_name(event_name)
        if meter is None:
            raise ApiError(
                400,
                f"No active meter was found for event_name `{event_name}`.",
                code="no_meter",
                param="event_name",
            )
        if meter["status"] != "active":
            raise ApiError(400, f"The meter for `{event_name}` is inactive.", code="archived_meter")
        now = self._now()
        if timestamp < now - PAST_WINDOW:
            raise ApiError(
                400,
                f"Timestamp {timestamp} is too far in the past: meter events must be within "
                "the past 35 calendar days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            )
        if timestamp > now + FUTURE_SKEW:
            raise ApiError(
                400,
                f"Timestamp {timestamp} is too far in the future: meter events can be at "
                "most 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            )
        customer_key = meter["customer_mapping"]["event_payload_key"]
        if not payload.get(customer_key):
            raise ApiError(
                400,
                f"The payload is missing the customer key `{customer_key}`.",
                code="meter_event_no_customer_defined",
                param=f"payload[{customer_key}]",
            )
        value_key = meter["value_settings"]["event_payload_key"]
        value = payload.get(value_key)
        needs_value = meter["default_aggregation"]["formula"] != "count"
        if (value is None and needs_value) or (
            value is not None and not re.fullmatch(r"-?\d+", value)
        ):
            raise ApiError(
                400,
                f"The payload value `{value_key}`={value!r} must be a whole number string.",
                code="meter_event_invalid_value",
                param=f"payload[{value_key}]",
            )
        return meter

    def _create_session(self, call: _Call) -> JSON:
        token = new_id("mes_tok", 32)
        created = self.clock()
        self._sessions[token] = created + SESSION_TTL
        return {
            "id": new_id("mes", 24),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _iso(created),
            "expires_at": _iso(created + SESSION_TTL),
            "livemode": False,
        }

    def _stream(self, call: _Call) -> _Reply:
        """Shape errors answer 400; event errors are asynchronous in Stripe (see module doc)."""
        events = call.params.get("events")
        if not isinstance(events, list) or not events:
            raise _missing("events")
        if len(events) > MAX_STREAM_EVENTS:
            raise _invalid("events", f"At most {MAX_STREAM_EVENTS} events per request.")
        for index, raw in enumerate(events):
            if not isinstance(raw, dict) or not isinstance(raw.get("event_name"), str):
                raise _missing(f"events[{index}][event_name]")
        for raw in events:
            try:
                self._accept_event(raw, self._v2_timestamp(raw.get("timestamp")), "stream")
            except ApiError as exc:
                self.meter_event_errors.append(
                    MeterEventError(
                        exc.code or "invalid_request",
                        exc.message,
                        raw["event_name"],
                        raw.get("identifier"),
                        "stream",
                    )
                )
        return _Reply(202, {})

    # -- checkout and portal -------------------------------------------------------------

    def _create_checkout(self, call: _Call) -> JSON:
        p = call.params
        mode = _required(p, "mode")
        if mode not in ("payment", "setup", "subscription"):
            raise _invalid("mode", f"Invalid mode: {mode}")
        customer = _str(p, "customer")
        if customer is not None and customer not in self.customers:
            raise _no_such("customer", customer, "customer", 400)
        embedded = p.get("ui_mode") == "embedded"
        if not embedded and _str(p, "success_url") is None:
            raise _missing("success_url")
        items = p.get("line_items", [])
        if not isinstance(items, list):
            raise _invalid("line_items", "line_items must be a list")
        if mode in ("payment", "subscription") and not items:
            raise _missing("line_items")
        for index, item in enumerate(items):
            self._check_line_item(mode, index, item)
        session = {
            **self._base_object("cs_test", "checkout.session"),
            "cancel_url": _str(p, "cancel_url"),
            "client_reference_id": _str(p, "client_reference_id"),
            "customer": customer,
            "customer_email": _str(p, "customer_email"),
            "expires_at": self._now() + 24 * 3600,
            "metadata": _apply_metadata({}, p.get("metadata")),
            "mode": mode,
            "payment_status": "unpaid",
            "status": "open",
            "subscription": None,
            "success_url": _str(p, "success_url"),
            "ui_mode": "embedded" if embedded else "hosted",
        }
        session["id"] = new_id("cs_test", 58)
        session["url"] = None if embedded else f"https://checkout.stripe.com/c/pay/{session['id']}"
        session["line_items_sent"] = items  # not a Stripe field: for test assertions
        self.checkout_sessions[session["id"]] = session
        return {k: v for k, v in session.items() if k != "line_items_sent"}

    def _check_line_item(self, mode: str, index: int, item: Any) -> None:
        name = f"line_items[{index}]"
        if not isinstance(item, dict):
            raise _invalid(name, f"Invalid object: {name}")
        price_id = item.get("price")
        if not isinstance(price_id, str):
            raise _missing(f"{name}[price]")
        price = self.prices.get(price_id)
        if price is None:
            raise _no_such("price", price_id, f"{name}[price]", 400)
        if not price["active"]:
            raise _invalid(f"{name}[price]", f"The price `{price_id}` is not active.")
        recurring = price["recurring"]
        if mode == "subscription" and recurring is None:
            raise _invalid(f"{name}[price]", "Subscription mode needs recurring prices.")
        if mode == "payment" and recurring is not None:
            raise _invalid(f"{name}[price]", "Payment mode takes one-time prices only.")
        metered = recurring is not None and recurring["usage_type"] == "metered"
        if metered and "quantity" in item:
            raise _invalid(
                f"{name}[quantity]",
                f"Quantity should not be specified where usage_type is `metered`. "
                f"Remove quantity from `{name}`.",
            )
        if not metered and "quantity" not in item:
            raise _missing(f"{name}[quantity]")

    def _get_checkout(self, call: _Call) -> JSON:
        session = self._get(self.checkout_sessions, "checkout.session", call.arg())
        return {k: v for k, v in session.items() if k != "line_items_sent"}

    # -- invoices, invoice items, credit notes --------------------------------------------

    def add_invoice(
        self, customer: str, total: int, currency: str = "usd", status: str = "paid"
    ) -> str:
        """An invoice Stripe made for ``customer`` (from its subscription), in minor units."""
        with self._lock:
            invoice = {
                **self._base_object("in", "invoice"),
                "customer": self._get(self.customers, "customer", customer)["id"],
                "currency": currency,
                "status": status,
                "total": total,
                "amount_paid": total if status == "paid" else 0,
                "amount_remaining": 0 if status == "paid" else total,
                "post_payment_credit_notes_amount": 0,
                "pre_payment_credit_notes_amount": 0,
            }
            self.invoices[invoice["id"]] = invoice
            return str(invoice["id"])

    _INVOICE_ITEM_PARAMS = (
        "customer", "amount", "currency", "description", "period", "metadata", "invoice",
        "discountable", "price_data", "pricing", "quantity", "unit_amount_decimal",
        "subscription", "tax_behavior", "tax_code", "tax_rates", "discounts",
    )  # fmt: skip

    def _create_invoice_item(self, call: _Call) -> JSON:
        p = call.params
        _check_known(p, set(self._INVOICE_ITEM_PARAMS))
        customer = self._get(self.customers, "customer", _required(p, "customer"))
        if "amount" not in p:
            raise _missing("amount")
        amount = _int(p["amount"], "amount")
        currency = _required(p, "currency").lower()
        period = _dict(p, "period")
        _check_known(period, {"start", "end"}, "period")
        start, end = (_int(period.get(k, self._now()), f"period[{k}]") for k in ("start", "end"))
        if end < start:
            raise _invalid("period[end]", "The period end must be after the period start.")
        item = {
            **self._base_object("ii", "invoiceitem"),
            "amount": amount,
            "currency": currency,
            "customer": customer["id"],
            "date": self._now(),
            "description": _str(p, "description"),
            "invoice": None,
            "metadata": _apply_metadata({}, p.get("metadata")),
            "period": {"start": start, "end": end},
            "proration": False,
            "quantity": 1,
        }
        self.invoice_items[item["id"]] = item
        return item

    def _create_credit_note(self, call: _Call) -> JSON:
        p = call.params
        _check_known(p, {"invoice", "lines", "memo", "metadata", "reason", "amount",
                         "credit_amount", "refund_amount", "out_of_band_amount"})  # fmt: skip
        invoice = self._get(self.invoices, "invoice", _required(p, "invoice"))
        if invoice["status"] not in ("open", "paid"):
            raise ApiError(
                400,
                f"Invoice {invoice['id']} is {invoice['status']}: credit notes can only be"
                " issued on open or paid invoices.",
                code="invoice_not_editable",
                param="invoice",
            )
        lines = _listify(p.get("lines", []), "lines")
        if not lines:
            raise _missing("lines")
        total = 0
        for index, line in enumerate(lines):
            _check_known(line, {"type", "description", "quantity", "unit_amount",
                                "unit_amount_decimal", "amount", "invoice_line_item",
                                "metadata", "tax_rates"}, f"lines[{index}]")  # fmt: skip
            if line.get("type") != "custom_line_item":
                raise _invalid(f"lines[{index}][type]", "Tally's fake takes custom_line_item only")
            quantity = _int(line.get("quantity", 1), f"lines[{index}][quantity]")
            unit = _int(line.get("unit_amount", ""), f"lines[{index}][unit_amount]")
            if unit < 0 or quantity < 1:
                raise _invalid(f"lines[{index}][unit_amount]", "Amounts must be positive.")
            total += quantity * unit
        paid = invoice["status"] == "paid"
        credited = (
            invoice["post_payment_credit_notes_amount"] + invoice["pre_payment_credit_notes_amount"]
        )
        if total + credited > invoice["total"]:
            raise ApiError(
                400,
                f"The credit note amount ({total}) exceeds the invoice amount available to"
                f" credit ({invoice['total'] - credited}).",
                code="credit_note_amount_too_large",
                param="lines",
            )
        invoice[
            "post_payment_credit_notes_amount" if paid else "pre_payment_credit_notes_amount"
        ] += total
        note = {
            **self._base_object("cn", "credit_note"),
            "amount": total,
            "currency": invoice["currency"],
            "customer": invoice["customer"],
            "invoice": invoice["id"],
            "memo": _str(p, "memo"),
            "metadata": _apply_metadata({}, p.get("metadata")),
            "number": f"{invoice['id'].upper()}-CN-{len(self.credit_notes) + 1:02d}",
            "reason": _str(p, "reason"),
            "status": "issued",
            "total": total,
            "type": "post_payment" if paid else "pre_payment",
        }
        self.credit_notes[note["id"]] = note
        return note

    def _create_portal(self, call: _Call) -> JSON:
        p = call.params
        customer = _required(p, "customer")
        if customer not in self.customers:
            raise _no_such("customer", customer, "customer", 400)
        session = {
            **self._base_object("bps", "billing_portal.session"),
            "configuration": new_id("bpc"),
            "customer": customer,
            "flow": None,
            "locale": _str(p, "locale"),
            "on_behalf_of": None,
            "return_url": _str(p, "return_url"),
        }
        session["url"] = f"https://billing.stripe.com/p/session/test_{_token(40)}"
        self.portal_sessions[session["id"]] = session
        return session


def _failure_reply(failure: _Failure) -> _Reply:
    """The Stripe-shaped body and headers for an injected failure."""
    status = failure.status
    if status == 429:
        code = failure.code or "rate_limit"
        message = (
            "This object cannot be accessed right now because another API request or Stripe "
            "process is currently accessing it."
            if code == "lock_timeout"
            else "Request rate limit exceeded (injected by FakeStripe)."
        )
        error = ApiError(429, message, code=code)
    elif status >= 500:
        error = ApiError(
            status, "An unknown error occurred (injected by FakeStripe).", type="api_error"
        )
    else:
        error = ApiError(status, f"Injected {status} (FakeStripe).", code=failure.code)
    reply = error.reply()
    if failure.retry_after is not None:
        reply.headers["Retry-After"] = str(failure.retry_after)
    if failure.should_retry is not None:
        reply.headers["Stripe-Should-Retry"] = "true" if failure.should_retry else "false"
    return reply


def _handler_class(fake: FakeStripe, base: Base) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to ``fake`` for one of its two listeners."""

    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            reply = fake.handle(base, self.command, self.path, headers, raw)
            data = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the recorded requests are the log."""

    return _Handler
