"""OpenMeter's meter API: ``GET /api/v1/meters``, ``/api/v1/meters/{slug}`` and
``/api/v1/meters/{slug}/query``, so code written for OpenMeter's SDK reads Tally.

A meter's slug is its Tally name; a subject is a customer.  A query reads the same
usage the usage API reads (live counters, then rollups), one subject at a time, so it
names its subjects: OpenMeter's query over every subject at once would be a scan of
every customer.  Without ``windowSize`` the windows of the range are folded into one
aggregate, which only meters whose windows fold can give (count, sum, max, min,
latest); a distinct count or an average over a range is asked with a window size.
Errors are RFC 7807 problems, as OpenMeter answers them.
"""

from __future__ import annotations

import ast
from datetime import datetime, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import orjson
from fastapi import APIRouter, Path, Request, Response
from psycopg_pool import AsyncConnectionPool

from schemas.api_keys import Scope
from schemas.catalog import Meter
from schemas.events import utcnow
from schemas.problem_types import BAD_REQUEST, UNKNOWN_METER
from schemas.windows import Window
from schemas.zones import ZoneError, asked_zone
from services.api.catalog import meter_store
from services.api.openmeter import shapes
from services.api.usage import zones
from services.api.usage.reader import UsageReader
from services.api.usage.selection import Selection, SelectionError
from services.common.auth import Authenticator, address, credential
from services.common.meter_cache import MeterCache
from services.common.openapi import problem_responses
from services.common.problems import Problem

PREFIX = "/api/v1/meters"
Slug = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="The meter's name")]
KNOWN = {
    "from",
    "to",
    "windowSize",
    "windowTimeZone",
    "subject",
    "filterCustomerId",
    "groupBy",
    "filterGroupBy",
    "clientId",
}
FILTER = "filterGroupBy"
MAX_FILTER_TEXT = 4096
DEFAULT_SPAN = timedelta(days=30)


class OpenMeterMeters:
    def __init__(
        self,
        reader: UsageReader,
        pool: AsyncConnectionPool,
        auth: Authenticator,
        meters: MeterCache,
    ) -> None:
        self._reader = reader
        self._pool = pool
        self._auth = auth
        self._meters = meters

    async def all(self, request: Request) -> list[dict[str, Any]]:
        await self._auth.caller(credential(request), address(request))
        async with self._pool.connection() as conn:
            stored = await meter_store.every(conn)
        return [shapes.meter(s.meter, s.created_at, s.updated_at) for s in stored if not s.archived]

    async def one(self, request: Request, slug: str) -> dict[str, Any]:
        await self._auth.caller(credential(request), address(request))
        async with self._pool.connection() as conn:
            stored = await meter_store.find(conn, slug)
        if stored is None or stored.archived:
            raise Problem(UNKNOWN_METER, f"no meter {slug!r}")
        return shapes.meter(stored.meter, stored.created_at, stored.updated_at)

    async def query(self, request: Request, slug: str) -> Response:
        caller = await self._auth.caller(credential(request), address(request))
        meter = (await self._meters.meters()).by_name.get(slug)
        if meter is None:
            raise Problem(UNKNOWN_METER, f"no meter {slug!r}")
        asked = _Query.of(request, meter)
        for subject in asked.subjects:
            await self._auth.require(caller, subject, Scope.USAGE_READ)
        data: list[dict[str, Any]] = []
        for subject in asked.subjects:
            data += await self._subject_rows(meter, asked, subject)
        body = {
            "from": shapes.stamp(asked.start),
            "to": shapes.stamp(asked.end),
            "windowSize": asked.size,
            "data": data,
        }
        return _json(body)

    async def _subject_rows(
        self, meter: Meter, asked: _Query, subject: str
    ) -> list[dict[str, Any]]:
        now, reader = utcnow(), self._reader
        if asked.zone is None:
            cells = await reader.read(
                subject, meter, asked.window, asked.start, asked.end, asked.grouped, now
            )
        else:
            try:
                cells = await reader.read_zoned(
                    subject, meter, asked.window, asked.start, asked.end, asked.grouped, now,
                    asked.zone,
                )  # fmt: skip
            except ZoneError as exc:
                raise _bad(f"windowTimeZone: {exc}") from None
        grouped = bool(asked.selection.keep)
        if not asked.selection.everything(meter):
            meter, cells = asked.selection.narrow(meter, cells)
        if asked.size is not None:
            return shapes.rows(cells.points(meter, grouped), subject)
        return shapes.folded(meter, cells, asked.start, asked.end, grouped, subject)


class _Query:
    """A query's parameters, checked: each refusal names the parameter."""

    def __init__(
        self,
        subjects: list[str],
        start: datetime,
        end: datetime,
        size: str | None,
        window: Window,
        selection: Selection,
        zone: ZoneInfo | None = None,
    ) -> None:
        self.subjects, self.start, self.end = subjects, start, end
        self.size, self.window, self.selection = size, window, selection
        # Read grouped whenever a group is kept or fixed: narrowing works on the groups.
        self.grouped = bool(selection.keep or selection.where)
        self.zone = zone  # local days and months (None: UTC, or minute and hour windows)

    @classmethod
    def of(cls, request: Request, meter: Meter) -> _Query:
        params = request.query_params
        unknown = sorted(k for k in set(params) - KNOWN if not _filter_key(k))
        if unknown:
            raise _bad(f"unknown query parameters: {', '.join(unknown)}")
        subjects = params.getlist("subject") + params.getlist("filterCustomerId")
        if not subjects:
            raise _bad("subject: name the subjects (customers) to query, e.g. ?subject=acme")
        zone = _zone(params.get("windowTimeZone", "UTC"), meter)
        size = params.get("windowSize")
        if size is not None and size not in shapes.WINDOW_SIZES:
            raise _bad(f"windowSize: one of {', '.join(shapes.WINDOW_SIZES)}; got {size!r}")
        if size is None and meter.aggregation not in shapes.FOLDABLE:
            raise _bad(
                f"windowSize: meter {meter.name!r} ({meter.aggregation.value}) cannot fold its"
                " windows into one value; ask with a windowSize"
            )
        end = _moment(params, "to") or utcnow()
        start = _moment(params, "from") or end - DEFAULT_SPAN
        if start >= end:
            raise _bad("from: must be before `to`")
        groups = [g for g in params.getlist("groupBy") if g != "subject"]
        try:
            selection = Selection.of(meter, groups, _filter(params))
        except SelectionError as exc:
            raise _bad(f"{'groupBy' if exc.part == 'keep' else FILTER}: {exc}") from None
        window = shapes.WINDOW_SIZES[size] if size else Window.DAY
        if window not in (Window.DAY, Window.MONTH):
            zone = None  # minutes and hours are the same instants in a whole-hour zone
        return cls(subjects, start, end, size, window, selection, zone)


def _filter_key(key: str) -> bool:
    return key.startswith(f"{FILTER}[") and key.endswith("]") and len(key) > len(FILTER) + 2


def _filter(params: Any) -> dict[str, str]:
    """``filterGroupBy`` as OpenMeter's spec writes it (``filterGroupBy[model]=gpt-4``,
    a deepObject), or as its Python SDK sends it: the dict's Python text in one parameter
    (``filterGroupBy={'model': 'gpt-4'}``), read as a literal, never evaluated."""
    where: dict[str, str] = {}
    for key, value in params.multi_items():
        if _filter_key(key):
            name = key[len(FILTER) + 1 : -1]
            if name in where:
                raise _bad(f"{FILTER}[{name}]: given twice; one value per group")
            where[name] = value
    text = params.get(FILTER)
    if text is None:
        return where
    if len(text) > MAX_FILTER_TEXT:
        raise _bad(f"{FILTER}: at most {MAX_FILTER_TEXT} characters")
    try:
        found = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        found = None
    if not isinstance(found, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in found.items()
    ):
        raise _bad(f"{FILTER}: a map of group names to values, e.g. {FILTER}[model]=gpt-4o")
    return where | found


def _zone(name: str, meter: Meter) -> ZoneInfo | None:
    """``windowTimeZone`` as the usage API's ``tz`` (``services.api.usage.zones``)."""
    try:
        tz = asked_zone(name)
    except ZoneError as exc:
        raise _bad(f"windowTimeZone: {exc}") from None
    if tz is not None and meter.aggregation not in zones.COMPOSABLE:
        raise _bad(
            f"windowTimeZone: meter {meter.name!r} ({meter.aggregation.value}) does not"
            " compose from hours; its windows are served in UTC only"
        )
    return tz


def _moment(params: Any, name: str) -> datetime | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"{name}: not an RFC 3339 date-time: {text!r}") from None
    if moment.tzinfo is None:
        raise _bad(f"{name}: must carry a UTC offset, e.g. 2026-11-01T00:00:00Z")
    return moment


def _json(body: Any) -> Response:
    """Written as built: the shapes are OpenMeter's, documented by the response models."""
    return Response(orjson.dumps(body), media_type="application/json")


def _bad(detail: str) -> Problem:
    return Problem(BAD_REQUEST, detail)


def router(meters: OpenMeterMeters) -> APIRouter:
    api = APIRouter(prefix=PREFIX, tags=["openmeter"])

    @api.get(
        "",
        summary="Meters, in OpenMeter's shape (its SDK's `meters.list`)",
        responses=problem_responses(401),
        response_model=list[shapes.OpenMeterMeter],
    )
    async def list_meters(request: Request) -> Response:
        return _json(await meters.all(request))

    @api.get(
        "/{slug}",
        summary="One meter, in OpenMeter's shape",
        responses=problem_responses(401, 404, 422),
        response_model=shapes.OpenMeterMeter,
    )
    async def get_meter(request: Request, slug: Slug) -> Response:
        return _json(await meters.one(request, slug))

    @api.get(
        "/{slug}/query",
        summary="Usage of subjects, in OpenMeter's query shape",
        responses=problem_responses(400, 401, 403, 404, 422),
        response_model=shapes.QueryResult,
    )
    async def query_meter(request: Request, slug: Slug) -> Response:
        return await meters.query(request, slug)

    return api
