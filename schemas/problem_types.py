"""Every kind of error Tally answers with: one registry of RFC 9457 problem types.

A client branches on a problem's ``type`` (``TYPE_BASE`` + slug), so the types are part
of the API contract: each is defined once here, with its status and title, and every
service raises its errors from these.  ``docs/api.md`` lists the same table (a test
keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_BASE = "https://tally.dev/problems/"


@dataclass(frozen=True, slots=True)
class ProblemType:
    slug: str
    status: int
    title: str

    @property
    def uri(self) -> str:
        return TYPE_BASE + self.slug


REGISTRY: dict[str, ProblemType] = {}


def _define(slug: str, status: int, title: str) -> ProblemType:
    assert slug not in REGISTRY, f"problem type {slug!r} defined twice"
    REGISTRY[slug] = found = ProblemType(slug, status, title)
    return found


# 400: the request cannot be read
MALFORMED_JSON = _define("malformed-json", 400, "Malformed JSON")
MALFORMED_BODY = _define("malformed-body", 400, "Malformed body")
EMPTY_BATCH = _define("empty-batch", 400, "Empty batch")
NOT_AN_EVENT = _define("not-an-event", 400, "Not a Stripe event")
BAD_SIGNATURE = _define("bad-signature", 400, "Webhook signature rejected")
BAD_REQUEST = _define("bad-request", 400, "Bad request")
EVENTS_REFUSED = _define("events-refused", 400, "Events refused")
# 401, 403: who is asking, and may they
UNAUTHORIZED = _define("unauthorized", 401, "Unauthorized")
FORBIDDEN = _define("forbidden", 403, "Forbidden")
INSUFFICIENT_SCOPE = _define("insufficient-scope", 403, "Insufficient scope")
SCOPE_ESCALATION = _define("scope-escalation", 403, "Scope escalation")
ACCOUNT_INACTIVE = _define("account-inactive", 403, "Account inactive")
PAYMENT_OVERDUE = _define("payment-overdue", 403, "Payment overdue")
# 404, 405: what is asked for
NOT_FOUND = _define("not-found", 404, "Not found")
UNKNOWN_CUSTOMER = _define("unknown-customer", 404, "Unknown customer")
UNKNOWN_KEY = _define("unknown-key", 404, "Unknown key")
UNKNOWN_PLAN = _define("unknown-plan", 404, "Unknown plan")
UNKNOWN_LEASE = _define("unknown-lease", 404, "Unknown lease")
UNKNOWN_ENDPOINT = _define("unknown-endpoint", 404, "Unknown webhook endpoint")
UNKNOWN_NOTIFICATION = _define("unknown-notification", 404, "Unknown notification")
UNKNOWN_ALERT = _define("unknown-alert", 404, "Unknown alert rule")
UNKNOWN_METER = _define("unknown-meter", 404, "Unknown meter")
METHOD_NOT_ALLOWED = _define("method-not-allowed", 405, "Method not allowed")
# 409: the state does not allow it
EMAIL_TAKEN = _define("email-taken", 409, "Email taken")
CUSTOMER_EXISTS = _define("customer-exists", 409, "Customer exists")
KEY_REVOKED = _define("key-revoked", 409, "Key revoked")
RESERVATION_CONFLICT = _define("reservation-conflict", 409, "Reservation conflict")
ALREADY_SUBSCRIBED = _define("already-subscribed", 409, "Already subscribed")
TOO_MANY_ENDPOINTS = _define("too-many-endpoints", 409, "Too many webhook endpoints")
METER_EXISTS = _define("meter-exists", 409, "Meter exists")
METER_LOCKED = _define("meter-definition-locked", 409, "Meter has counted events")
METER_IN_USE = _define("meter-in-use", 409, "Meter in use by plans")
CORRECTION_CONFLICT = _define("correction-conflict", 409, "Correction id reused")
TIMEZONE_LOCKED = _define("timezone-locked", 409, "Billing time zone locked by invoices")
LEASE_DECLINED = _define("lease-declined", 409, "Lease declined: decide per request")
# 413, 415: too much, or the wrong kind
PAYLOAD_TOO_LARGE = _define("payload-too-large", 413, "Payload too large")
REQUEST_TIMEOUT = _define("request-timeout", 408, "Request timeout")
BATCH_TOO_LARGE = _define("batch-too-large", 413, "Batch too large")
UNSUPPORTED_MEDIA_TYPE = _define("unsupported-media-type", 415, "Unsupported media type")
UNSUPPORTED_ENCODING = _define("unsupported-encoding", 415, "Unsupported content encoding")
# 422: readable, but wrong
INVALID_REQUEST = _define("invalid-request", 422, "Invalid request")
INVALID_PARAMETER = _define("invalid-parameter", 422, "Invalid parameter")
INVALID_EVENTS = _define("invalid-events", 422, "Invalid events")
INVALID_URL = _define("invalid-url", 422, "Malformed URL")
INSECURE_URL = _define("insecure-url", 422, "URL is not https")
PRIVATE_ADDRESS = _define("private-address", 422, "URL resolves to a private address")
UNRESOLVABLE_HOST = _define("unresolvable-host", 422, "Host does not resolve")
UNKNOWN_EVENT_TYPE = _define("unknown-event-type", 422, "Unknown event type")
NEGATIVE_USAGE = _define("negative-usage", 422, "Correction would make usage negative")
# 429: too much, too fast
RATE_LIMITED = _define("rate-limited", 429, "Rate limit exceeded")
QUOTA_EXCEEDED = _define("quota-exceeded", 429, "Quota exceeded")
# 5xx: Tally or what it depends on
INTERNAL_ERROR = _define("internal-error", 500, "Internal server error")
STRIPE_ERROR = _define("stripe-error", 502, "Stripe refused the request")
BACK_FAILED = _define("back-failed", 502, "Back process failed")
BROKER_UNAVAILABLE = _define("broker-unavailable", 503, "Events not stored")
JOURNAL_UNAVAILABLE = _define("journal-unavailable", 503, "Events not made durable")
"""Ingest's write-ahead log could not store them (disk full, I/O error): none accepted."""
OVERLOADED = _define("overloaded", 503, "Aggregation is behind; events refused")
BACK_UNAVAILABLE = _define("back-unavailable", 503, "Back process unavailable")
STORE_UNAVAILABLE = _define("store-unavailable", 503, "Store unavailable")
ENFORCEMENT_UNAVAILABLE = _define("enforcement-unavailable", 503, "Enforcement unavailable")
STRIPE_NOT_CONFIGURED = _define("stripe-not-configured", 503, "Stripe is not configured")
HTTP_ERROR = _define("http-error", 400, "HTTP error")
"""Any other error the HTTP framework answers (its own status and phrase as title)."""
# analytics SQL (``docs/analytics.md``): ``reason`` names what, in a stable slug
SQL_INVALID = _define("sql-invalid", 400, "Invalid SQL")
SQL_NOT_ALLOWED = _define("sql-not-allowed", 400, "SQL not allowed")
SQL_LIMIT_EXCEEDED = _define("sql-limit-exceeded", 422, "Query limit exceeded")
ANALYTICS_UNAVAILABLE = _define("analytics-unavailable", 503, "Analytics SQL unavailable")
