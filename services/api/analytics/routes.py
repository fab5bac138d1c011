"""``POST /v1/analytics/sql``: who may run SQL, over whose rows, and the answer's shape.

The admin token sees every customer's rows (or one's, naming ``customer``); a customer's
key with ``usage:read`` sees its own rows only, whatever its SQL says; a service token
acts for one customer it names, as it does on the usage routes.  The tenant is fixed
here, before the SQL is even parsed, and reaches ClickHouse only as a bound parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN
from schemas.problem_types import ANALYTICS_UNAVAILABLE, SQL_INVALID, SQL_NOT_ALLOWED
from services.api.analytics.guard import Refused, guard
from services.api.analytics.runner import Result, Runner
from services.common.auth import Authenticator, address, credential
from services.common.logging import get_logger
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field
from services.common.settings import Settings

log = get_logger("tally.analytics")
PATH = "/v1/analytics/sql"
Scalar = str | int | float | bool
UNAVAILABLE = (
    "analytics SQL runs where ClickHouse can be read: in `tally up` (the process that owns"
    " chDB), or with CLICKHOUSE_URL set; this process has neither"
)


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sql: str = Field(description="One SELECT over the analytics tables (docs/analytics.md).")
    params: dict[str, Scalar | list[Scalar]] = Field(
        default_factory=dict,
        description="Values for the SQL's {name:Type} placeholders; send decimals as strings.",
    )
    format: Literal["json", "csv"] = "json"
    customer: Annotated[str | None, Field(pattern=CUSTOMER_ID_PATTERN)] = Field(
        None,
        description="Whose rows: required with a service token; the admin token's default"
        " is every customer; a key may name only its own.",
    )


class Column(BaseModel):
    name: str
    type: str = Field(description="The ClickHouse type, e.g. Decimal(38, 6).")


class SqlResult(BaseModel):
    columns: list[Column]
    rows: list[list[Any]] = Field(
        description="One list per row, in the columns' order; decimals as strings."
    )
    rows_read: int | None = Field(description="Rows ClickHouse read to answer.")
    elapsed_ms: float
    truncated: bool = Field(
        description="More rows matched than returned: the default LIMIT or the cap cut them."
    )


class Analytics:
    """The route's work: authorize, guard, run, encode."""

    def __init__(
        self, settings: Settings, auth: Authenticator, runner: Runner | None, database: str
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._runner = runner
        self._database = database

    async def tenant(self, request: Request, named: str | None) -> str | None:
        """Whose rows the caller may see: ``None`` is every customer's (admin only)."""
        token = credential(request)
        if self._auth.is_admin(token):
            return named
        caller = await self._auth.caller(token, address(request))
        if caller.customer is None:
            if named is None:
                raise invalid_field(
                    "body.customer", "required with a service token: it acts for one customer"
                )
            return named
        await self._auth.require(caller, named or caller.customer, Scope.USAGE_READ)
        return caller.customer

    async def answer(self, request: Request, body: SqlRequest) -> Response:
        tenant = await self.tenant(request, body.customer)
        if self._runner is None:
            raise Problem(ANALYTICS_UNAVAILABLE, UNAVAILABLE)
        settings = self._settings
        try:
            guarded = guard(
                body.sql,
                body.params,
                tenant,
                self._database,
                settings.analytics_default_rows,
                settings.analytics_max_rows,
            )
        except Refused as refused:
            kind = SQL_INVALID if refused.invalid else SQL_NOT_ALLOWED
            raise Problem(kind, refused.detail, reason=refused.reason) from None
        result = await self._runner.run(guarded)
        _log(tenant, result)
        if body.format == "csv":
            return Response(
                result.as_csv(),
                media_type="text/csv; charset=utf-8",
                headers={"Tally-Truncated": str(result.truncated).lower()},
            )
        return Response(orjson.dumps(result.as_json()), media_type="application/json")


def _log(tenant: str | None, result: Result) -> None:
    log.info(
        "analytics sql",
        customer=tenant or "*",
        rows=len(result.rows),
        rows_read=result.rows_read,
        elapsed_ms=result.elapsed_ms,
        truncated=result.truncated,
    )


def _responses() -> dict[int | str, dict[str, Any]]:
    responses = problem_responses(400, 401, 403, 422, 429, 503)
    said = {
        400: "SQL that does not parse (`sql-invalid`) or is not allowed (`sql-not-allowed`):"
        " `reason` says why",
        422: "A field of the request is invalid, or the query reached a limit"
        " (`sql-limit-exceeded`: `limit` says which)",
        503: "Analytics SQL needs `tally up` or CLICKHOUSE_URL; or ClickHouse is unavailable",
    }
    for status, description in said.items():
        responses[status] = {**responses[status], "description": description}
    return {200: {"content": {"text/csv": {"schema": {"type": "string"}}}}, **responses}


def router(analytics: Analytics) -> APIRouter:
    api = APIRouter(tags=["analytics"])

    @api.post(
        PATH,
        summary="Run one SELECT over the analytics tables",
        response_model=SqlResult,
        responses=_responses(),
    )
    async def sql(request: Request, body: SqlRequest) -> Response:
        """A customer's key sees only its own rows; the admin token, every customer's.
        Refused SQL is a 400 naming its ``reason``; a limit reached, a 422 naming
        ``limit`` (docs/analytics.md)."""
        return await analytics.answer(request, body)

    return api
