"""The enforcement routes: one decision, or a batch of independent ones."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from services.api.auth import Authenticator, address, credential
from services.api.enforcement import (
    MAX_BATCH,
    Answer,
    BatchRequest,
    Enforcer,
    EnforceRequest,
)
from services.common.problems import Problem, field_path

REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing, malformed, unknown, revoked or expired key"},
    403: {"description": "Account inactive, key of another customer, or key lacks scope"},
    422: {"description": "Unknown meter, bad quantity, reserve without event"},
    429: {"description": "A rate limit or hard quota refused; Retry-After says when to retry"},
    503: {"description": "The limits store is unreachable and the server fails closed"},
}


def router(auth: Authenticator, enforcer: Enforcer) -> APIRouter:
    api = APIRouter(tags=["enforcement"])

    @api.post(
        "/v1/enforce",
        summary="Decide one call: allowed or refused, with remaining and reset",
        responses=REFUSALS,
    )
    async def enforce(body: EnforceRequest, request: Request) -> Response:
        client = address(request)
        auth.limit_address(client)
        caller = await auth.caller(credential(request), client)
        return _response(await enforcer.enforce(caller, body))

    @api.post(
        "/v1/enforce/batch",
        summary=f"Up to {MAX_BATCH} decisions, each independent, in order",
        responses=REFUSALS,
    )
    async def enforce_batch(body: BatchRequest, request: Request) -> dict[str, Any]:
        client = address(request)
        auth.limit_address(client)
        caller = await auth.caller(credential(request), client)
        results = []
        for index, item in enumerate(body.checks):
            try:
                answer = await enforcer.enforce(caller, EnforceRequest.model_validate(item))
                results.append({"status": answer.status, "body": answer.body})
            except Problem as problem:
                results.append({"status": problem.status, "body": problem.body()})
            except ValidationError as exc:
                results.append({"status": 422, "body": _invalid_item(index, exc)})
        return {"results": results}

    return api


def _response(answer: Answer) -> Response:
    return Response(
        orjson.dumps(answer.body),
        status_code=answer.status,
        media_type="application/json",
        headers=answer.headers,
    )


def _invalid_item(index: int, exc: ValidationError) -> dict[str, Any]:
    errors = [
        {"field": field_path((f"checks[{index}]", *e["loc"])), "reason": e["msg"]}
        for e in exc.errors()
    ]
    fields = ", ".join(e["field"] for e in errors)
    return Problem(
        422, "invalid-request", "Invalid request", f"invalid: {fields}", errors=errors
    ).body()
