"""The query API's routes: meters, and a customer's usage (its own key, or a service's)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from starlette.routing import Route

from schemas.api_keys import Scope
from schemas.catalog import Aggregation, Meter
from schemas.date_times import RFC3339
from schemas.events import CUSTOMER_ID_PATTERN, utcnow
from schemas.problem_types import INVALID_PARAMETER
from schemas.text import control_character
from schemas.windows import RETENTION, Window, buckets
from schemas.zones import ZoneError, asked_zone
from services.api.usage import ranking, zones
from services.api.usage.reader import MAX_BUCKETS, UsageReader
from services.api.usage.selection import Selection, SelectionError
from services.common.auth import Authenticator, address, credential
from services.common.meter_cache import MeterCache, MeterIndex
from services.common.openapi import problem_responses
from services.common.problems import invalid_field, invalid_parameter, invalid_request
from services.common.queries import single_values

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
END_OF_TIME = datetime(3000, 1, 1, tzinfo=UTC)  # moments before it: through 2999
DEFAULT_SPAN = {
    Window.MINUTE: timedelta(hours=1),
    Window.HOUR: timedelta(hours=24),
    Window.DAY: timedelta(days=30),
    Window.MONTH: timedelta(days=365),
}
DEFAULT_LIMIT = 10
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


class GroupTotal(BaseModel):
    groups: dict[str, str] = Field(description="The group's dimension values.")
    value: str = Field(description="The group's value over the range, a decimal as a string.")


class UsageSeries(BaseModel):
    customer: str
    meter: str
    aggregation: Aggregation
    window: Window
    from_: Timestamp = Field(alias="from")
    to: Timestamp
    group_by: list[str]
    tz: str = Field(description="The time zone of the buckets.")
    data: list[UsagePoint] = Field(
        description="One point per window (per window and group, grouped), oldest first."
    )
    totals: list[GroupTotal] | None = Field(
        None, description="With order_by=value: the top groups' totals, largest first."
    )


class UsageQuery(BaseModel):
    """The usage read's query parameters: one model, so the hot path and the documented
    route validate them alike.  Unknown parameters are refused, named: a misspelt
    ``group_by`` must not pass as the default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    meter: str = Field(description="Meter name, e.g. api_calls")
    from_: Annotated[datetime | None, RFC3339] = Field(
        None, alias="from", description="RFC 3339, inclusive"
    )
    to: Annotated[datetime | None, RFC3339] = Field(
        None, description="RFC 3339, exclusive; default now"
    )
    window: Window = Window.DAY
    group_by: str | None = Field(
        None, description="Comma-separated dimensions: the meter's group_by"
    )
    order_by: str | None = Field(
        None,
        description="`value`: only the groups with the largest totals over the range,"
        " largest first (needs group_by)",
    )
    limit: str | None = Field(
        None,
        description=f"With order_by: how many groups, 1 to {ranking.MAX_LIMIT}"
        f" (default {DEFAULT_LIMIT})",
        json_schema_extra={"type": "integer"},
    )
    tz: str | None = Field(
        None,
        description="IANA time zone of the day and month buckets (default UTC), e.g."
        " America/New_York: a local day may last 23 or 25 hours. Whole-hour zones only;"
        " days and months of sum, count, max and min meters. Minute and hour buckets are"
        " the same in every whole-hour zone: shown in its offset.",
    )


USAGE_PATH = "/v1/customers/{customer}/usage"
_CUSTOMER = re.compile(CUSTOMER_ID_PATTERN)


class Usage:
    """A customer's usage of one meter: the one implementation behind both routes."""

    def __init__(
        self, redis: Redis, pool: AsyncConnectionPool, auth: Authenticator, meters: MeterCache
    ) -> None:
        self.reader = UsageReader(redis, pool)
        self._auth = auth
        self._meters = meters

    async def hot(self, request: Request) -> Response:
        """``GET /v1/customers/{c}/usage`` as a hot path (``services.common.hot_paths``):
        FastAPI's parameter solving and middleware cost a third of a month's read.
        Who asks, and may it read this customer, is settled first (``allow``)."""
        await self.allow(request)
        customer = request.path_params["customer"]
        if not _CUSTOMER.fullmatch(customer):
            raise invalid_field(
                "path.customer",
                control_character(customer) or f"String should match pattern '{_CUSTOMER.pattern}'",
            )
        try:
            query = UsageQuery.model_validate(single_values(request, INVALID_PARAMETER))
        except ValidationError as exc:
            raise invalid_request(exc.errors(), "query", INVALID_PARAMETER) from None
        return await self.answer(customer, query)

    async def allow(self, request: Request) -> None:
        """Whether the caller may read the path's customer's usage: a caller without a
        valid key learns that (401), one with another customer's key that (403), not
        what its query lacks."""
        caller = await self._auth.caller(credential(request), address(request))
        await self._auth.require(caller, request.path_params["customer"], Scope.USAGE_READ)

    async def answer(self, customer: str, query: UsageQuery) -> Response:
        """The usage series of an allowed read (``allow``)."""
        found = _meter(await self._meters.meters(), query.meter)
        now, window = utcnow(), query.window
        end = _aware("to", query.to) if query.to else now
        start = _aware("from", query.from_) if query.from_ else end - DEFAULT_SPAN[window]
        _check_range(window, start, end, now)
        selection = _grouping(found, query.group_by)
        grouped = bool(selection.keep)
        top = _top(grouped, query.order_by, query.limit)
        if top is not None and found.aggregation is Aggregation.AVG:
            raise invalid_parameter(
                "order_by",
                f"meter {found.name!r} averages: an average over several buckets needs their"
                " counts, which are not kept; rank a sum or count meter instead",
            )
        tz = _zone(found, window, query.tz, start, end)
        if tz is None or window in (Window.MINUTE, Window.HOUR):
            # Groups merged by the selection rank only once merged: read them all then.
            rank = top if selection.everything(found) else None
            cells = await self.reader.read(customer, found, window, start, end, grouped, now, rank)
            if tz is not None:  # the same buckets, stamped with the zone's offsets
                cells = cells.shown_in(tz)
        else:
            try:
                cells = await self.reader.read_zoned(
                    customer, found, window, start, end, grouped, now, tz
                )
            except ZoneError as exc:
                raise invalid_parameter("tz", str(exc)) from None
        if not selection.everything(found):
            found, cells = selection.narrow(found, cells)
        series: dict[str, Any] = {
            "customer": customer,
            "meter": found.name,
            "aggregation": found.aggregation.value,
            "window": window.value,
            "from": start.isoformat(),
            "to": end.isoformat(),
            "group_by": list(found.group_names) if grouped else [],
            "tz": tz.key if tz is not None else "UTC",
        }
        if top is None:
            series["data"] = cells.rows(found, grouped)
        else:
            ranked = ranking.top(found, cells, top)
            series["totals"] = [t.as_json() for t in ranked]
            series["data"] = cells.rows(found, grouped, [t.field for t in ranked])
        # Encoded here, as ``UsageSeries`` documents it: FastAPI would validate the model
        # again and encode it through ``jsonable_encoder``, point by point.
        return Response(orjson.dumps(series), media_type="application/json")


def fast_routes(usage: Usage) -> list[Route]:
    return [Route(USAGE_PATH, usage.hot, methods=["GET"])]


def router(usage: Usage, meters: MeterCache) -> APIRouter:
    api = APIRouter(tags=["usage"], responses=problem_responses(503))

    @api.get("/v1/meters", summary="The meters of the catalog")
    async def list_meters() -> MeterList:
        return MeterList(meters=list((await meters.meters()).all))

    @api.get(
        USAGE_PATH,
        summary="A customer's usage of one meter over time",
        response_model=UsageSeries,
        responses=problem_responses(401, 403, 422, 429),
    )
    async def usage_route(
        request: Request,
        customer: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)],
        query: Annotated[UsageQuery, Query()],
    ) -> Response:
        """Served by the hot path ``Usage.hot``; declared here for the OpenAPI document
        (and the router's 405 for other methods)."""
        await usage.allow(request)
        return await usage.answer(customer, query)

    return api


def _meter(meters: MeterIndex, name: str) -> Meter:
    """From the cached meters: a meter created since is in the cache within
    milliseconds (``MeterCache``), so a miss needs no query.  An archived meter counts
    no more, but what it counted is still read."""
    found = meters.by_name.get(name) or meters.archived.get(name)
    if found is None:
        known = ", ".join(m.name for m in meters.all)
        raise invalid_parameter("meter", f"unknown meter {name!r}; known meters: {known}")
    return found


def _aware(field: str, moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise invalid_parameter(
            field, "must carry a UTC offset (RFC 3339), e.g. 2026-11-01T00:00:00Z"
        )
    if not EARLIEST <= moment < END_OF_TIME:
        raise invalid_parameter(field, f"must lie between {EARLIEST:%Y} and {END_OF_TIME.year - 1}")
    return moment


def _zone(
    meter: Meter, window: Window, name: str | None, start: datetime, end: datetime
) -> ZoneInfo | None:
    """The zone the buckets are in; None for UTC.  Minute and hour buckets are the same
    instants in every whole-hour zone: they are read as they are, shown in the zone."""
    if name is None:
        return None
    try:
        tz = asked_zone(name)
        if tz is not None and window in (Window.MINUTE, Window.HOUR):
            zones.local_buckets(Window.DAY, start, end, tz)  # refuses a :30 or :45 zone
            return tz
    except ZoneError as exc:
        raise invalid_parameter("tz", str(exc)) from None
    if tz is not None and meter.aggregation not in zones.COMPOSABLE:
        raise invalid_parameter(
            "tz",
            f"meter {meter.name!r} aggregates with {meter.aggregation}: it does not compose"
            " from hours, so its days and months are served in UTC only",
        )
    return tz


def _check_range(window: Window, start: datetime, end: datetime, now: datetime) -> None:
    if start >= end:
        raise invalid_parameter("from", "must be before `to`")
    if window in (Window.MINUTE, Window.HOUR) and start < now - RETENTION[window]:
        hours = int(RETENTION[window].total_seconds() // 3600)
        raise invalid_parameter(
            "from", f"{window.value} buckets are kept for {hours} hours; use a coarser window"
        )
    if len(list(islice(buckets(window, start, end), MAX_BUCKETS + 1))) > MAX_BUCKETS:
        raise invalid_parameter(
            "from", f"the range spans more than {MAX_BUCKETS} {window.value}s, the limit"
        )


def _grouping(meter: Meter, group_by: str | None) -> Selection:
    """The dimensions asked for: all of the meter's, or some (the others merged)."""
    asked = tuple(d.strip() for d in (group_by or "").split(",") if d.strip())
    try:
        return Selection.of(meter, asked, {})
    except SelectionError as exc:
        raise invalid_parameter("group_by", str(exc)) from None


def _top(grouped: bool, order_by: str | None, limit: str | None) -> int | None:
    """How many groups ``order_by=value`` keeps; ``None`` when the series is not ranked."""
    if order_by is None:
        if limit is not None:
            raise invalid_parameter("limit", "only with order_by=value")
        return None
    if order_by != "value":
        raise invalid_parameter("order_by", f"must be 'value'; got {order_by!r}")
    if not grouped:
        raise invalid_parameter("order_by", "ranks groups: needs group_by")
    if limit is None:
        return DEFAULT_LIMIT
    digits = limit.isascii() and limit.isdigit() and len(limit) <= 4
    if not digits or not 1 <= int(limit) <= ranking.MAX_LIMIT:
        raise invalid_parameter("limit", f"must be a whole number from 1 to {ranking.MAX_LIMIT}")
    return int(limit)
