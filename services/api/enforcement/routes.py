"""The enforcement routes: one decision, or a batch of independent ones.

They are plain Starlette routes served as hot paths (``services.common.hot_paths``),
ahead of FastAPI's application: its dependency solving, body and response handling and
middleware cost more per request than a decision's own work, on the path whose latency
the product sells.  Their OpenAPI entries are written out below instead.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
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
)
from services.common.auth import Authenticator, Caller, address, credential
from services.common.openapi import component_schemas, ref
from services.common.problems import PROBLEM_JSON, Problem, invalid_request

Model = TypeVar("Model", bound=BaseModel)


def routes(auth: Authenticator, addresses: AddressLimit, enforcer: Enforcer) -> list[Route]:
    async def caller(request: Request) -> Caller:
        client = address(request)
        addresses.check(client)
        return await auth.caller(credential(request), client)

    async def enforce(request: Request) -> Response:
        body = _parse(EnforceRequest, await request.body())
        return _response(await enforcer.enforce(await caller(request), body))

    async def enforce_batch(request: Request) -> Response:
        batch = _parse(BatchRequest, await request.body())
        who = await caller(request)
        results = []
        for index, item in enumerate(batch.checks):
            try:
                answer = await enforcer.enforce(who, EnforceRequest.model_validate(item))
                results.append({"status": answer.status, "body": answer.body})
            except Problem as problem:
                results.append({"status": problem.status, "body": problem.body()})
            except ValidationError as exc:
                invalid = invalid_request(exc.errors(), f"checks[{index}]")
                results.append({"status": 422, "body": invalid.body()})
        return Response(orjson.dumps({"results": results}), media_type="application/json")

    return [
        Route("/v1/enforce", enforce, methods=["POST"]),
        Route("/v1/enforce/batch", enforce_batch, methods=["POST"]),
    ]


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
    return component_schemas(EnforceRequest, BatchRequest)


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": {"type": "object"}}}}


REFUSALS = {
    "401": _problem("Missing, malformed, unknown, revoked or expired key"),
    "403": _problem("Account inactive, another customer's id, or a key without the scope"),
    "404": _problem("A service token naming no customer"),
    "422": _problem("Unknown meter, bad quantity, reserve without event; `errors` names fields"),
    "429": _problem("A rate limit or hard quota refused: `policy`, `retry_after`, `upgrade`"),
    "503": _problem("The limits store is unreachable and the server fails closed"),
}
RATE_HEADERS = {
    "RateLimit-Policy": {"schema": {"type": "string"}, "description": "every policy applied"},
    "RateLimit": {"schema": {"type": "string"}, "description": "the one closest to refusing"},
}


def _operation(summary: str, model: type[BaseModel], ok: str) -> dict[str, Any]:
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
                    "headers": RATE_HEADERS,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **REFUSALS,
            },
        }
    }


def openapi_paths() -> dict[str, Any]:
    return {
        "/v1/enforce": _operation(
            "Decide one call: allowed or refused, with remaining and reset",
            EnforceRequest,
            "Allowed: the decision, and the RateLimit fields",
        ),
        "/v1/enforce/batch": _operation(
            f"Up to {MAX_BATCH} decisions, each independent, in order",
            BatchRequest,
            "Each decision's status and body, in order",
        ),
    }
