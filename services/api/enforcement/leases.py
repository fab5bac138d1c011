"""``POST /v1/leases``: units and tokens a process spends locally, settled by its events.

A lease is the edge's way to decide without a round trip per call (DESIGN.md decision
8): the SDK takes one, admits calls from it in-process, tags the usage events of those
calls with the lease's id (the ``tallylease`` extension attribute), renews it before it
runs out and returns what it did not spend.  The exactness lives in ``lease.lua``: the
grant is taken atomically against the same limits ``/v1/enforce`` applies and shrinks to
one unit near a limit; this module checks the request and shapes the answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN, LEASE_ID_PATTERN, Dimension, utcnow
from schemas.problem_types import ENFORCEMENT_UNAVAILABLE, LEASE_DECLINED, UNKNOWN_LEASE
from services.api.enforcement.enforcer import Answer, Enforcer
from services.api.enforcement.leaser import Grant, LeaseAsk, LeaseMode, Leaser, new_lease_id
from services.api.enforcement.limiter import Code
from services.api.enforcement.refusals import decision, headers
from services.common.auth import Caller
from services.common.problems import Problem, invalid_field
from services.common.redis import UNREACHABLE

MAX_LEASE = 10_000
"""The most calls one lease may ask for (``want``)."""

LeaseId = Annotated[str, Field(pattern=LEASE_ID_PATTERN)]
Customer = Annotated[str | None, Field(pattern=CUSTOMER_ID_PATTERN)]


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer: Customer = Field(
        None, description="Required with a service token; implied by an API key."
    )
    meter: Annotated[str, Field(min_length=1, max_length=64)] = "api_calls"
    endpoint: Dimension = Field(
        "", description="Endpoint-specific rate limits and costs apply, as in /v1/enforce."
    )
    want: Annotated[int, Field(strict=True, ge=1, le=MAX_LEASE)] = Field(
        description="Calls wanted; the grant may be smaller, never larger."
    )
    lease: LeaseId | None = Field(
        None,
        description="Renew this lease: its unspent units are returned first, atomically."
        " With `term` 1: the id to take a new lease under (96 random bits, chosen by the"
        " client so that a resent request names the same lease).",
    )
    spent: Annotated[int, Field(strict=True, ge=0, le=MAX_LEASE)] | None = Field(
        None, description="When renewing: calls spent of the lease's current grant."
    )
    term: Annotated[int, Field(strict=True, ge=1, le=2**53)] | None = Field(
        None,
        description="The term this request starts: 1 takes the lease `lease` names, n > 1"
        " renews it into its nth term.  A numbered request is idempotent: sent again (its"
        " answer lost on a dropped connection) it gets the same answer and takes nothing"
        " more.  Without it a resent take holds a second grant until the settle window.",
    )

    def check(self) -> None:
        """What the fields say together; 422 naming the field at fault (a model
        validator could only name the body)."""
        if self.term is not None and self.lease is None:
            raise invalid_field("body.term", "term needs lease: the lease it is a term of")
        if self.lease is None and self.spent is not None:
            raise invalid_field("body.spent", "spent is for renewals: name the lease it spent")
        if self.term == 1 and self.spent is not None:
            raise invalid_field("body.spent", "spent is for renewals; term 1 takes a new lease")
        if self.lease is not None and self.term != 1 and self.spent is None:
            raise invalid_field("body.spent", "spent is required when renewing a lease")

    @property
    def renewing(self) -> bool:
        return self.lease is not None and self.term != 1


class ReturnRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer: Customer = Field(
        None, description="Required with a service token; implied by an API key."
    )
    lease: LeaseId
    spent: Annotated[int, Field(strict=True, ge=0, le=MAX_LEASE)] = Field(
        description="Calls spent of the lease's current grant; the rest is freed at once."
    )
    term: Annotated[int, Field(strict=True, ge=1, le=2**53)] | None = Field(
        None,
        description="The term returned (the lease's current one): a late or repeated"
        " return of an older term frees nothing.",
    )


class Leases:
    def __init__(self, enforcer: Enforcer, leaser: Leaser, settle_seconds: int) -> None:
        self._enforcer = enforcer
        self._leaser = leaser
        self._settle = settle_seconds

    async def take(self, caller: Caller, request: LeaseRequest) -> Answer:
        request.check()
        customer = self._enforcer.customer(caller, request.customer)
        await self._enforcer.check_meter(request.meter)
        ask = LeaseAsk(
            lease=request.lease or new_lease_id(),
            mode=LeaseMode.RENEW if request.renewing else LeaseMode.TAKE,
            meter=request.meter,
            want=request.want,
            spent=request.spent or 0,
            endpoint=request.endpoint,
            key_id=caller.key_id,
            scope=Scope.ENFORCE.value,
            term=request.term or 0,
        )
        grant = await self._ask(customer, ask)
        outcome = grant.outcome
        if outcome.code is Code.LEASE_METER:
            raise invalid_field(
                "body.meter", f"lease {ask.lease} is a lease of meter {grant.meter!r}; renew it so"
            )
        if outcome.code is Code.LEASE_REUSED:
            raise invalid_field(
                "body.term",
                f"term {ask.term} of lease {ask.lease} was asked for already with another"
                " meter, endpoint, spent or key: a resend repeats its request exactly",
            )
        if outcome.code is Code.LEASE_TAKEN:
            raise invalid_field(
                "body.lease", f"lease {ask.lease} exists already; take a new lease under a new id"
            )
        if outcome.code is Code.PER_REQUEST:
            raise Problem(
                LEASE_DECLINED,
                f"rate limit {outcome.policy!r} of plan {outcome.plan!r} counts each end user:"
                " decide these calls one by one with POST /v1/enforce, naming end_user",
                policy=outcome.policy,
            )
        if outcome.code is not Code.OK:
            raise self._enforcer.problem(customer, outcome)
        tokens = {lim.policy: grant.tokens for lim in outcome.limits if lim.kind == "rate"}
        body = decision(outcome, customer) | {
            "lease": ask.lease,
            "term": request.term,
            "meter": request.meter,
            "endpoint": request.endpoint,
            "granted": grant.granted,
            "tokens": tokens,
            "expires_at": _moment(grant.expires_ms),
            "expires_in_ms": grant.expires_in_ms,
            "ttl_ms": self._leaser.ttl_ms,
            "settle_seconds": self._settle,
            "returned": _number(grant.freed),
        }
        return Answer(200, body, headers(outcome))

    async def give_back(self, caller: Caller, request: ReturnRequest) -> Answer:
        customer = self._enforcer.customer(caller, request.customer)
        ask = LeaseAsk(
            lease=request.lease,
            mode=LeaseMode.RETURN,
            spent=request.spent,
            key_id=caller.key_id,  # a key returns only if it could take: as a take checks it
            scope=Scope.ENFORCE.value,
            term=request.term or 0,
        )
        grant = await self._ask(customer, ask)
        if grant.outcome.code is not Code.RETURNED:
            raise self._enforcer.problem(customer, grant.outcome)
        body = {
            "lease": request.lease,
            "customer": customer,
            "meter": grant.meter,
            "returned": _number(grant.freed),
            "held": _number(grant.held),
            "settle_seconds": self._settle,
        }
        return Answer(200, body, {})

    async def _ask(self, customer: str, ask: LeaseAsk) -> Grant:
        """Ask; put right a missing projection or an ended trial and ask once more, as
        ``/v1/enforce`` does.  An unknown lease is the caller's mistake."""
        grant = await self._grant(customer, ask)
        if await self._enforcer.repair(customer, grant.outcome.code):
            grant = await self._grant(customer, ask)
            if grant.outcome.code is Code.NO_ACCOUNT:
                raise RuntimeError(f"customer {customer} could not be projected into Redis")
            if grant.outcome.code is Code.TRIAL_EXPIRED:  # Redis and PostgreSQL clocks differ
                grant.outcome.code = Code.INACTIVE
        if grant.outcome.code is Code.LEASE_UNKNOWN:
            raise Problem(
                UNKNOWN_LEASE,
                f"no lease {ask.lease} of customer {customer}: it never existed, belongs"
                " to another customer, or ended and settled; take a new one",
                errors=[{"field": "body.lease", "reason": "unknown lease"}],
            )
        if grant.outcome.code is Code.LEASE_OVERSPENT:
            raise invalid_field(
                "body.spent",
                f"spent {ask.spent} is more calls than the {grant.granted} lease {ask.lease}"
                " granted for its current term; nothing was changed",
            )
        if grant.outcome.code is Code.LEASE_STALE:
            raise Problem(
                UNKNOWN_LEASE,
                f"term {ask.term} is not the next of lease {ask.lease}: a late copy of an"
                " older request, or a lease this client no longer follows; nothing was"
                " changed — take a new lease",
                errors=[{"field": "body.term", "reason": "not the lease's next term"}],
            )
        return grant

    async def _grant(self, customer: str, ask: LeaseAsk) -> Grant:
        """A lease is never granted without Redis, whatever the failure mode: the holder
        keeps to ``/v1/enforce`` meanwhile, which fails open or closed as configured."""
        try:
            return await self._leaser.ask(customer, ask, utcnow())
        except UNREACHABLE:
            raise Problem(
                ENFORCEMENT_UNAVAILABLE,
                "the limits store cannot be reached: no lease is granted without it;"
                " decide calls with /v1/enforce meanwhile",
                headers={"Retry-After": "1"},
            ) from None


def _moment(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _number(amount: Decimal) -> int | str:
    return int(amount) if amount == amount.to_integral_value() else str(amount)
