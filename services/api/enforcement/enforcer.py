"""``POST /v1/enforce``: may this customer make this call now?

One Redis round trip decides (``enforce.lua``).  The slow paths are rare and
self-healing: a customer not yet projected into Redis is projected and asked again; a
trial that ran out is ended (downgraded or suspended) and asked again.  When Redis
cannot be reached, the configured failure mode answers: closed refuses with 503, open
admits through an in-process limiter that keeps each customer to the rate limits last
seen for it (``fallback``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.api_keys import Scope
from schemas.events import (
    CUSTOMER_ID_PATTERN,
    VALUE_STRING_PATTERN,
    DecimalText,
    Dimension,
    NonEmpty,
    utcnow,
)
from schemas.problem_types import (
    ACCOUNT_INACTIVE,
    ENFORCEMENT_UNAVAILABLE,
    PAYMENT_OVERDUE,
    RESERVATION_CONFLICT,
)
from schemas.text import PRINTABLE_PATTERN
from services.api.accounts import projection
from services.api.accounts import store as accounts
from services.api.enforcement import trials
from services.api.enforcement.exhaustion import Exhaustion
from services.api.enforcement.fallback import Fallback
from services.api.enforcement.limiter import Ask, Code, Limiter, Mode, Outcome
from services.api.enforcement.refusals import decision, headers, refused
from services.common import auth, metrics
from services.common.auth import Caller, check_holder, forbidden_customer
from services.common.logging import get_logger
from services.common.meter_cache import MeterCache
from services.common.problems import Problem, invalid_field, unauthorized, unknown_customer
from services.common.redis import UNREACHABLE
from services.common.settings import Settings

log = get_logger("tally.enforce")

MAX_BATCH = 100
MAX_QUANTITY = 10**9  # in micro-units below 2^53, exact in the script's arithmetic


class EventRef(BaseModel):
    """The usage event that will settle a reservation: its idempotency key."""

    model_config = ConfigDict(extra="forbid")

    source: NonEmpty  # the event's own rules, control characters refused
    id: NonEmpty


class EnforceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer: Annotated[str | None, Field(pattern=CUSTOMER_ID_PATTERN)] = Field(
        None, description="Required with a service token; implied by an API key."
    )
    meter: Annotated[str, Field(min_length=1, max_length=64)] = "api_calls"
    endpoint: Dimension = Field(
        "", description="The endpoint called, as its events name it (their `endpoint`)."
    )
    quantity: Annotated[Decimal, DecimalText] = Field(
        Decimal(1), description="Units of the meter this call will use; > 0, ≤ 6 decimals."
    )
    mode: Literal["check", "reserve"] = "check"
    event: EventRef | None = Field(
        None, description="With mode=reserve: the usage event that settles the reservation."
    )
    end_user: Annotated[str, Field(max_length=256, pattern=PRINTABLE_PATTERN)] = Field(
        "",
        description="Who the customer's call is for (its caller's address, a user id): the"
        " count of rate limits scoped per end user. Required when one applies.",
    )

    @field_validator("quantity")
    @classmethod
    def _quantity(cls, value: Decimal) -> Decimal:
        if value <= 0:
            raise ValueError("must be greater than 0")
        if value > MAX_QUANTITY or not re.match(VALUE_STRING_PATTERN, format(value, "f")):
            raise ValueError(f"must be at most {MAX_QUANTITY:,} with at most 6 decimals")
        return value


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checks: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_BATCH)]


_ALLOWED = metrics.ENFORCE_DECISIONS.labels("allowed")
_REFUSED = metrics.ENFORCE_DECISIONS.labels("refused")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class Enforcer:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: AsyncConnectionPool,
        limiter: Limiter,
        meters: MeterCache,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._pool = pool
        self._limiter = limiter
        self._fallback = Fallback(settings.fallback_rate_per_minute)
        self._meters = meters
        self._exhaustion = Exhaustion(redis, limiter.zone_of)
        self._redis_up = True
        metrics.REDIS_AVAILABLE.set(1)

    async def enforce(self, caller: Caller, request: EnforceRequest) -> Answer:
        customer = self.customer(caller, request.customer)
        await self.check_meter(request.meter)
        if request.mode == "reserve" and request.event is None:
            raise invalid_field(
                "body.event", "mode=reserve needs the event (source, id) that settles it"
            )
        ask = Ask(
            meter=request.meter,
            quantity=request.quantity,
            endpoint=request.endpoint,
            mode=Mode(request.mode),
            digest=(
                redis_keys.event_digest(request.event.source, request.event.id)
                if request.event
                else b""
            ),
            key_id=caller.key_id,
            scope=Scope.ENFORCE.value,
            end_user=request.end_user,
        )
        try:
            outcome = await self._decide(customer, ask)
        except UNREACHABLE as exc:
            if self._redis_up:
                log.warning("limits store unavailable", error=repr(exc))
            self._redis_up = False
            return await self._unavailable(caller, customer)
        if not self._redis_up:
            log.info("limits store available again")
            self._redis_up = True
            metrics.REDIS_AVAILABLE.set(1)
        self._fallback.remember(customer, outcome)
        return self._answer(customer, request, outcome)

    async def _decide(self, customer: str, ask: Ask) -> Outcome:
        """Ask; when Redis lacks the account or the key (never projected, or a
        projection that failed), or the trial just ran out, put that right and ask once
        more.  What is still wrong the second time is the answer."""
        outcome = await self._limiter.decide(customer, ask, utcnow())
        if not await self.repair(customer, outcome.code):
            return outcome
        outcome = await self._limiter.decide(customer, ask, utcnow())
        if outcome.code is Code.NO_ACCOUNT:
            raise RuntimeError(f"customer {customer} could not be projected into Redis")
        if outcome.code is Code.TRIAL_EXPIRED:  # the clocks of Redis and PostgreSQL differ
            outcome.code = Code.INACTIVE
        return outcome

    async def repair(self, customer: str, code: Code) -> bool:
        """Put right what a decision found missing or stale in Redis (an account or key
        never projected, a trial that ran out); True when it is worth asking again."""
        if code in (Code.NO_ACCOUNT, Code.KEY_UNKNOWN):
            await self._project(customer)
        elif code is Code.TRIAL_EXPIRED:
            await self._end_trial(customer)
        else:
            return False
        return True

    def customer(self, caller: Caller, requested: str | None) -> str:
        """Whom a call is about: a key's own customer, or the one a service token names."""
        if caller.customer is None:
            if requested is None:
                raise invalid_field("body.customer", "required when enforcing with a service token")
            return requested
        if requested not in (None, caller.customer):
            raise forbidden_customer()
        return caller.customer

    async def check_meter(self, meter: str) -> None:
        """Against the cached meters: a meter created since is in the cache within
        milliseconds (``MeterCache``), so a miss needs no query."""
        known = (await self._meters.meters()).by_name
        if meter not in known:
            names = ", ".join(sorted(known))
            raise invalid_field("body.meter", f"unknown meter {meter!r}; known meters: {names}")

    async def _project(self, customer: str) -> None:
        if not await projection.project_customer(self._redis, self._pool, customer):
            raise unknown_customer(customer)

    async def _end_trial(self, customer: str) -> None:
        await trials.end_trial(self._settings, self._redis, self._pool, customer)

    def _answer(self, customer: str, request: EnforceRequest, outcome: Outcome) -> Answer:
        code = outcome.code
        if code is Code.OK:
            _ALLOWED.inc()
            body = decision(outcome, customer)
            body["reservation"] = (
                {
                    "event": request.event.model_dump(),
                    "expires_in": self._settings.reservation_ttl_seconds,
                }
                if outcome.reserved and request.event
                else None
            )
            return Answer(200, body, headers(outcome))
        _REFUSED.inc()
        raise self.problem(customer, outcome)

    def problem(self, customer: str, outcome: Outcome) -> Problem:
        """The problem a refusal is answered with (any code but OK)."""
        code = outcome.code
        if code is Code.REFUSED:
            assert outcome.violated is not None
            self._exhaustion.refused(customer, outcome, utcnow())
            what = "quota" if outcome.violated.kind == "quota" else "rate limit"
            return refused(
                outcome,
                f"{what} {outcome.violated.policy!r} of plan {outcome.plan!r} exhausted",
                customer,
            )
        if code is Code.INACTIVE:
            return _inactive(outcome.status)
        if code is Code.PAST_DUE:
            return _overdue(customer, datetime.fromtimestamp(outcome.grace_ended_ms / 1000, UTC))
        if code is Code.KEY_SCOPE:
            return auth.insufficient_scope(Scope.ENFORCE)
        if code is Code.RESERVATION_CONFLICT:
            return Problem(
                RESERVATION_CONFLICT,
                "this event already holds a reservation of another meter or quantity",
            )
        if code is Code.END_USER_REQUIRED:
            return invalid_field(
                "body.end_user",
                f"rate limit {outcome.policy!r} of plan {outcome.plan!r} counts each end user:"
                " name the end user this call is for",
            )
        return unauthorized(_KEY_PROBLEMS[code])

    async def _unavailable(self, caller: Caller, customer: str) -> Answer:
        metrics.REDIS_AVAILABLE.set(0)
        mode = self._settings.redis_failure_mode
        metrics.ENFORCE_FALLBACK.labels(mode).inc()
        if mode == "closed":
            raise Problem(
                ENFORCEMENT_UNAVAILABLE,
                "the limits store cannot be reached and this server fails closed",
                headers={"Retry-After": "1"},
            )
        await self._still_allowed(caller, customer)
        outcome = self._fallback.decide(customer)
        body = decision(outcome, customer) | {"fallback": True, "reservation": None}
        if not outcome.allowed:
            raise refused(outcome, "rate limit exhausted (in-process fallback limiter)", customer)
        return Answer(200, body, headers(outcome))

    async def _still_allowed(self, caller: Caller, customer: str) -> None:
        """Failing open admits beyond the limits, never a revoked key or a closed
        account: without Redis, PostgreSQL says so (slower, but this is the rare path)."""
        async with self._pool.connection() as conn:
            account = await accounts.get_customer(conn, customer)
            key = await accounts.get_key(conn, caller.key_id) if caller.key_id else None
        if account is None:
            raise unknown_customer(customer)
        if key is not None:
            check_holder(key.holder(), Scope.ENFORCE, utcnow())
        if account.status in (accounts.Status.CANCELLED, accounts.Status.SUSPENDED):
            raise _inactive(account.status.value)
        if account.status is accounts.Status.PAST_DUE:
            ends = account.status_since + timedelta(hours=self._settings.past_due_grace_hours)
            if ends <= utcnow():
                raise _overdue(customer, ends)


def _inactive(status: str) -> Problem:
    return Problem(
        ACCOUNT_INACTIVE,
        f"the account is {status}",
        account_status=status,
    )


def _overdue(customer: str, grace_ended: datetime) -> Problem:
    """Refusing an unpaid account says how to pay: the billing portal."""
    return Problem(
        PAYMENT_OVERDUE,
        f"the account is past_due and its grace period ended at {grace_ended.isoformat()};"
        " paying the open invoice restores access",
        account_status="past_due",
        grace_ended_at=grace_ended.isoformat(),
        billing_portal=f"/v1/customers/{customer}/billing/portal",
    )


_KEY_PROBLEMS = {
    Code.KEY_UNKNOWN: "unknown API key",
    Code.KEY_REVOKED: "the API key was revoked",
    Code.KEY_EXPIRED: "the API key has expired",
}
