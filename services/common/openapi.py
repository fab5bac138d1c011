"""OpenAPI components for routes that read their own bodies (FastAPI documents only
the bodies it parses itself), and the problem+json answers every router declares."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from services.common.problems import PROBLEM_JSON

REF = "#/components/schemas/{model}"


def component_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """The models' JSON Schemas (and those they refer to), keyed by model name."""
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = top["$defs"]
    return schemas


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


class InvalidField(BaseModel):
    field: str = Field(description="Where: `data.value`, `checks[2].meter`, `limit`…")
    reason: str


class ProblemDetails(BaseModel):
    """RFC 9457 problem details (``application/problem+json``): every error Tally
    answers with.  Problem types add members of their own (``errors``, ``policy``,
    ``retry_after``, ``upgrade``, ``store``, ``allowed``…)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="The problem type, e.g. https://tally.dev/problems/rate-limited")
    title: str
    status: int
    detail: str
    instance: str | None = Field(None, description="The request's path")
    errors: list[InvalidField] | None = Field(None, description="With 422: each failing field")


PROBLEMS = {
    400: "Malformed body, or a webhook whose signature or payload is rejected",
    401: "Missing, malformed, unknown, revoked or expired credential",
    403: "Another customer's id, a key without the scope, or an inactive account",
    404: "Unknown customer, key or plan",
    409: "Conflicts with what exists: a taken email or id, a revoked key, a subscription",
    413: "The body is over the size or event-count limit",
    415: "A content type or content encoding that is not accepted",
    422: "Invalid request: `errors` names each failing field",
    429: "Too many requests (a limit, or an address that keeps guessing credentials);"
    " see Retry-After",
    502: "Stripe refused or did not answer",
    503: "A store (PostgreSQL, Redis, ClickHouse, Kafka) or Stripe is unavailable; see Retry-After",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for problem+json answers with these statuses (the
    ``ProblemDetails`` schema is among every Tally process's components)."""
    return {
        status: {
            "description": PROBLEMS[status],
            "content": {PROBLEM_JSON: {"schema": ref(ProblemDetails)}},
        }
        for status in statuses
    }


def problem_schemas() -> dict[str, Any]:
    return component_schemas(ProblemDetails)


def document_framework_problems(spec: dict[str, Any]) -> None:
    """Add the answers the framework gives before any route's own code runs, to every
    operation they can reach: FastAPI refuses a body it cannot decode (not UTF-8, not
    JSON) with 400 (problem+json through ``problems.install``), so every operation
    that takes a body documents 400, whichever router declared it."""
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                responses = operation.setdefault("responses", {})
                responses.setdefault("400", problem_responses(400)[400])
