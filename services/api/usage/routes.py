"""The query API's routes: meters, and a customer's usage (its own key, or a service's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from schemas.api_keys import Scope
from schemas.catalog import Aggregation, Meter
from schemas.events import CUSTOMER_ID_PATTERN, utcnow
from schemas.problem_types import INVALID_PARAMETER
from schemas.windows import RETENTION, Window, buckets
from services.api.usage.reader import MAX_BUCKETS, UsageReader
from services.common import catalog
from services.common.auth import Authenticator, address, credential
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2999, 12, 31, tzinfo=UTC)
DEFAULT_SPAN = {
    Window.MINUTE: timedelta(hours=1),
    Window.HOUR: timedelta(hours=24),
    Window.DAY: timedelta(days=30),
    Window.MONTH: timedelta(days=365),
}
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]  # RFC 3339


class MeterList(BaseModel):
    meters: list[Meter]


class UsagePoint(BaseModel):
    start: Timestamp
    end: Timestamp
    value: str = Field(description="A decimal, as a string.")
    groups: dict[str, str] | None = Field(
        None, description="With group_by: the group's dimension values (absent otherwise)."
    )


class UsageSeries(BaseModel):
    customer: str
    meter: str
    aggregation: Aggregation
    window: Window
    from_: Timestamp = Field(alias="from")
    to: Timestamp
    group_by: list[str]
    data: list[UsagePoint] = Field(description="One point per window, oldest first.")


def router(redis: Redis, pool: AsyncConnectionPool, auth: Authenticator) -> APIRouter:
    api = APIRouter(tags=["usage"], responses=problem_responses(503))
    reader = UsageReader(redis, pool)

    @api.get("/v1/meters", summary="The meters of the catalog")
    async def list_meters() -> MeterList:
        return MeterList(meters=await catalog.read_meters(pool))

    @api.get(
        "/v1/customers/{customer}/usage",
        summary="A customer's usage of one meter over time",
        response_model_exclude_none=True,  # a point has groups only when grouped
        responses=problem_responses(401, 403, 422, 429),
    )
    async def usage(
        request: Request,
        customer: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)],
        meter: Annotated[str, Query(description="Meter name, e.g. api_calls")],
        from_: Annotated[
            datetime | None, Query(alias="from", description="RFC 3339, inclusive")
        ] = None,
        to: Annotated[
            datetime | None, Query(description="RFC 3339, exclusive; default now")
        ] = None,
        window: Window = Window.DAY,
        group_by: Annotated[
            str | None, Query(description="Comma-separated dimensions: the meter's group_by")
        ] = None,
    ) -> UsageSeries:
        caller = await auth.caller(credential(request), address(request))
        await auth.require(caller, customer, Scope.USAGE_READ)
        found = await _meter(pool, meter)
        now = utcnow()
        end = _aware("to", to) if to else now
        start = _aware("from", from_) if from_ else end - DEFAULT_SPAN[window]
        _check_range(window, start, end, now)
        grouped = _grouping(found, group_by)
        points = await reader.read(customer, found, window, start, end, grouped, now)
        series = {
            "customer": customer,
            "meter": found.name,
            "aggregation": found.aggregation.value,
            "window": window.value,
            "from": start.isoformat(),
            "to": end.isoformat(),
            "group_by": list(found.group_by) if grouped else [],
            "data": [p.as_json() for p in points],
        }
        return UsageSeries.model_validate(series)

    return api


async def _meter(pool: AsyncConnectionPool, name: str) -> Meter:
    meters = await catalog.read_meters(pool)
    for meter in meters:
        if meter.name == name:
            return meter
    known = ", ".join(m.name for m in meters)
    raise _invalid("meter", f"unknown meter {name!r}; known meters: {known}")


def _aware(field: str, moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise _invalid(field, "must carry a UTC offset (RFC 3339), e.g. 2026-11-01T00:00:00Z")
    if not EARLIEST <= moment <= LATEST:
        raise _invalid(field, f"must lie between {EARLIEST:%Y} and {LATEST:%Y}")
    return moment


def _check_range(window: Window, start: datetime, end: datetime, now: datetime) -> None:
    if start >= end:
        raise _invalid("from", "must be before `to`")
    if window in (Window.MINUTE, Window.HOUR) and start < now - RETENTION[window]:
        hours = int(RETENTION[window].total_seconds() // 3600)
        raise _invalid(
            "from", f"{window.value} buckets are kept for {hours} hours; use a coarser window"
        )
    if len(list(islice(buckets(window, start, end), MAX_BUCKETS + 1))) > MAX_BUCKETS:
        raise _invalid(
            "from", f"the range spans more than {MAX_BUCKETS} {window.value}s, the limit"
        )


def _grouping(meter: Meter, group_by: str | None) -> bool:
    if not group_by:
        return False
    asked = tuple(d.strip() for d in group_by.split(",") if d.strip())
    if set(asked) != set(meter.group_by):
        allowed = ",".join(meter.group_by) or "(none)"
        raise _invalid("group_by", f"meter {meter.name!r} groups by {allowed}; got {group_by!r}")
    return True


def _invalid(field: str, reason: str) -> Problem:
    return invalid_field(field, reason, INVALID_PARAMETER)
