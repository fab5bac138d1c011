"""The enforcement routes: one decision, or a batch of independent ones.

They are plain Starlette routes served as hot paths (``services.common.hot_paths``),
ahead of FastAPI's application: its dependency solving, body and response handling and
middleware cost more per request than a decision's own work, on the path whose latency
the product sells.  Their OpenAPI entries are written out below instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.api.enforcement.address_limit import AddressLimit
from services.api.enforcement.enforcer import (
    MAX_BATCH,
    Answer,
    BatchRequest,
    Enforcer,
    EnforceRequest,
    EventRef,
)
from services.api.enforcement.leases import LeaseRequest, Leases, ReturnRequest
from services.common.auth import Authenticator, Caller, address, credential
from services.common.bodies import bounded
from services.common.openapi import ProblemDetails, component_schemas, problem_responses, ref
from services.common.problems import Problem, invalid_request

Model = TypeVar("Model", bound=BaseModel)
MAX_BODY = 1 << 20
"""A decision's or a lease's body is well under 1 KiB, a batch of 100 checks under
100 KiB: 1 MiB is room enough, and more is refused (413) before it is read whole."""


class EnforceLimit(BaseModel):
    """One policy's state after the decision."""

    policy: str
    kind: Literal["rate", "quota"]
    limit: int | str = Field(description="Whole amounts as numbers, fractional as decimal strings")
    remaining: int | str
    reset: int = Field(description="Seconds until it resets")
    window: int = Field(description="Seconds")
    algorithm: str | None = Field(None, description="Rate limits only")
    hard: bool | None = Field(None, description="Quotas only")


class EnforceReservation(BaseModel):
    event: EventRef = Field(description="The usage event that settles it")
    expires_in: int = Field(description="Seconds until it lapses, unless settled")


class Decision(BaseModel):
    """What every admission reports (refusals are problem+json with these members too)."""

    allowed: bool
    customer: str | None
    plan: str | None
    account_status: str | None
    policy: str | None = Field(description="The policy that refused, if any")
    remaining: int | str | None = Field(description="Of the policy closest to refusing")
    reset: int | None = Field(description="Seconds until that policy resets")
    retry_after: int | None
    limits: list[EnforceLimit]


class EnforceDecision(Decision):
    """An allowed call (refusals are problem+json with these members too)."""

    reservation: EnforceReservation | None = Field(description="With mode=reserve")
    fallback: bool | None = Field(
        None, description="Present when the limits store was down and the server failed open"
    )


class LeaseGrant(Decision):
    """A lease: calls to admit locally until ``expires_at``, tagging their events."""

    lease: str = Field(description="Its id: the tallylease attribute of events spent under it")
    term: int | None = Field(description="The request's term number, when it gave one")
    meter: str
    endpoint: str
    granted: int = Field(description="Calls granted (≤ want): quota units held, tokens taken")
    tokens: dict[str, int] = Field(description="Tokens taken from each rate limit that applied")
    expires_at: str = Field(description="When the grant ends (RFC 3339, Tally's clock)")
    expires_in_ms: int = Field(
        description="How long the grant has left: ttl_ms, less when a resend is answered"
    )
    ttl_ms: int = Field(description="A grant's lifetime: the bound on plan and key changes")
    settle_seconds: int = Field(description="How long spent units wait for their events")
    returned: int | str = Field(description="Renewals: units of the previous grant freed")


class LeaseReturned(BaseModel):
    lease: str
    customer: str
    meter: str
    returned: int | str = Field(description="Unspent units freed now")
    held: int | str = Field(description="Spent units still held until their events are counted")
    settle_seconds: int = Field(description="The most they stay held")


class EnforceBatchResult(BaseModel):
    status: int = Field(description="What the one decision's own request would have answered")
    body: EnforceDecision | ProblemDetails


class EnforceBatchResults(BaseModel):
    results: list[EnforceBatchResult] = Field(description="One per check, in order")


def _identify(
    auth: Authenticator, addresses: AddressLimit
) -> Callable[[Request], Awaitable[Caller]]:
    """Who calls a hot path: the per-address limit first, then the credential."""

    async def caller(request: Request) -> Caller:
        client = address(request)
        addresses.check(client)
        return await auth.caller(credential(request), client)

    return caller


def routes(auth: Authenticator, addresses: AddressLimit, enforcer: Enforcer) -> list[Route]:
    caller = _identify(auth, addresses)

    async def enforce(request: Request) -> Response:
        raw, who = await _read(request, caller)
        return _response(await enforcer.enforce(who, _parse(EnforceRequest, raw)))

    async def enforce_batch(request: Request) -> Response:
        raw, who = await _read(request, caller)
        batch = _parse(BatchRequest, raw)
        results = []
        for index, item in enumerate(batch.checks):
            try:
                answer = await enforcer.enforce(who, EnforceRequest.model_validate(item))
                results.append({"status": answer.status, "body": answer.body})
            except Problem as problem:
                results.append({"status": problem.status, "body": _within(problem, index)})
            except ValidationError as exc:
                invalid = invalid_request(exc.errors(), f"checks[{index}]")
                results.append({"status": 422, "body": invalid.body()})
        return Response(orjson.dumps({"results": results}), media_type="application/json")

    return [
        Route("/v1/enforce", enforce, methods=["POST"]),
        Route("/v1/enforce/batch", enforce_batch, methods=["POST"]),
    ]


def lease_routes(auth: Authenticator, addresses: AddressLimit, leases: Leases) -> list[Route]:
    caller = _identify(auth, addresses)

    async def take(request: Request) -> Response:
        raw, who = await _read(request, caller)
        return _response(await leases.take(who, _parse(LeaseRequest, raw)))

    async def give_back(request: Request) -> Response:
        raw, who = await _read(request, caller)
        return _response(await leases.give_back(who, _parse(ReturnRequest, raw)))

    return [
        Route("/v1/leases", take, methods=["POST"]),
        Route("/v1/leases/return", give_back, methods=["POST"]),
    ]


def _within(problem: Problem, index: int) -> dict[str, Any]:
    """A check's problem in a batch: its fields named under ``checks[index]``, as a
    check's schema errors are (``body.meter`` of one check is ``checks[2].meter``)."""
    body = problem.body()
    errors = body.get("errors")
    if errors:
        body["errors"] = [
            e | {"field": f"checks[{index}]." + e["field"].removeprefix("body.")} for e in errors
        ]
    return body


async def _read(
    request: Request, caller: Callable[[Request], Awaitable[Caller]]
) -> tuple[bytes, Caller]:
    """The body, bounded (a body too large is refused before anything else), then who
    sends it: a caller without a valid key learns that (401), not what its body lacks."""
    raw = await bounded(request, MAX_BODY)
    return raw, await caller(request)


def _parse(model: type[Model], raw: bytes) -> Model:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), "body") from None


def _response(answer: Answer) -> Response:
    return Response(
        orjson.dumps(answer.body),
        status_code=answer.status,
        media_type="application/json",
        headers=answer.headers,
    )


def openapi_schemas() -> dict[str, Any]:
    return component_schemas(
        EnforceRequest,
        BatchRequest,
        EnforceDecision,
        EnforceBatchResults,
        LeaseRequest,
        LeaseGrant,
        ReturnRequest,
        LeaseReturned,
    )


def _problem(status: int, description: str) -> dict[str, Any]:
    return problem_responses(status)[status] | {"description": description}


REFUSALS = {
    "400": _problem(400, "The body is not JSON"),
    "401": _problem(401, "Missing, malformed, unknown, revoked or expired key"),
    "403": _problem(403, "Account inactive, another customer's id, or a key without the scope"),
    "404": _problem(404, "A service token naming no customer"),
    "409": _problem(409, "The event already holds a reservation of another meter or quantity"),
    "415": _problem(
        415,
        "The body was sent with a Content-Encoding (send it as is) or a Content-Type other"
        " than JSON",
    ),
    "422": _problem(
        422, "Unknown meter, bad quantity, reserve without event; `errors` names fields"
    ),
    "429": _problem(429, "A rate limit or hard quota refused: `policy`, `retry_after`, `upgrade`"),
    "503": _problem(503, "The limits store is unreachable and the server fails closed"),
}
RATE_HEADERS = {
    "RateLimit-Policy": {"schema": {"type": "string"}, "description": "every policy applied"},
    "RateLimit": {"schema": {"type": "string"}, "description": "the one closest to refusing"},
}


LEASE_REFUSALS = {
    **{status: REFUSALS[status] for status in ("400", "401", "403", "415", "429", "503")},
    "404": _problem(404, "A service token naming no customer, or an unknown lease"),
    "422": _problem(422, "Unknown meter, want or spent out of range; `errors` names fields"),
}
RETURN_REFUSALS = {
    status: LEASE_REFUSALS[status] for status in ("400", "401", "403", "404", "415", "422", "503")
}


def _operation(
    summary: str,
    model: type[BaseModel],
    answer: type[BaseModel],
    ok: str,
    refusals: dict[str, Any] | None = None,
    rate_headers: bool = True,
) -> dict[str, Any]:
    return {
        "post": {
            "tags": ["enforcement"],
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref(model)}},
            },
            "responses": {
                "200": {
                    "description": ok,
                    **({"headers": RATE_HEADERS} if rate_headers else {}),
                    "content": {"application/json": {"schema": ref(answer)}},
                },
                **(REFUSALS if refusals is None else refusals),
            },
        }
    }


def openapi_paths() -> dict[str, Any]:
    return {
        "/v1/enforce": _operation(
            "Decide one call: allowed or refused, with remaining and reset",
            EnforceRequest,
            EnforceDecision,
            "Allowed: the decision, and the RateLimit fields",
        ),
        "/v1/enforce/batch": _operation(
            f"Up to {MAX_BATCH} decisions, each independent, in order",
            BatchRequest,
            EnforceBatchResults,
            "Each decision's status and body, in order",
        ),
        "/v1/leases": _operation(
            "Take or renew a lease: calls to admit locally, settled by their events",
            LeaseRequest,
            LeaseGrant,
            "Granted: the lease, and the RateLimit fields",
            LEASE_REFUSALS,
        ),
        "/v1/leases/return": _operation(
            "Return a lease: its unspent units are freed at once",
            ReturnRequest,
            LeaseReturned,
            "Returned: what was freed and what still awaits its events",
            RETURN_REFUSALS,
            rate_headers=False,
        ),
    }
