"""The admin API for meters (admin token): meters as live, versioned, audited data.

A meter created or changed here counts from the next event on: the change bumps the
catalog version, this process's meter cache reloads before the answer (so its ingest
stamps every later event with the new version) and PostgreSQL tells every other
process's cache, which reloads within ``TALLY_METER_REFRESH_SECONDS`` at worst.  What
would rewrite history — a new event type, aggregation, value property or filters for a
meter that has counted events — is refused: such a meter is a new meter (create it, move
the plans to it, archive the old one).  ``group_by``, ``description`` and ``unit`` change
in place.  Archiving keeps a meter's history and is refused while a plan uses it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.catalog import Meter
from schemas.problem_types import METER_EXISTS, METER_IN_USE, METER_LOCKED, UNKNOWN_METER
from services.api.accounts import store as accounts
from services.api.accounts.admin_routes import admin_api
from services.api.accounts.service import Accounts
from services.api.catalog import meter_store
from services.api.catalog.history import History, history
from services.api.catalog.meter_store import StoredMeter
from services.common.meter_cache import MeterCache
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field

ACTOR = "admin"
MeterName = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class CatalogMeter(Meter):
    """A meter as stored: its definition, version, and since when it counts live."""

    version: int
    counting_from: int = Field(
        description="The catalog version since which events count live; events stamped"
        " before are counted by `tally meters backfill`."
    )
    archived: bool
    created_at: datetime


class CatalogMeters(BaseModel):
    meters: list[CatalogMeter]


def _out(stored: StoredMeter) -> CatalogMeter:
    return CatalogMeter.model_validate(
        stored.meter.model_dump(by_alias=True)
        | {
            "version": stored.version,
            "counting_from": stored.counting_from,
            "archived": stored.archived,
            "created_at": stored.created_at,
        }
    )


def router(service: Accounts, cache: MeterCache) -> APIRouter:
    api = admin_api(service)
    pool, redis = service.pool, service.redis

    async def changed(stored: StoredMeter) -> CatalogMeter:
        """Reload this process's meters before answering: an event accepted here after
        the answer is stamped with the new catalog version, so the meter counts it."""
        await cache.refresh()
        return _out(stored)

    @api.get("/meters", summary="Every meter, archived ones too")
    async def list_meters() -> CatalogMeters:
        async with pool.connection() as conn:
            return CatalogMeters(meters=[_out(m) for m in await meter_store.every(conn)])

    @api.post(
        "/meters",
        status_code=201,
        summary="Create a meter: it counts from the next event on",
        responses=problem_responses(409, 422),
    )
    async def create_meter(meter: Meter) -> CatalogMeter:
        async with pool.connection() as conn:
            if await meter_store.find(conn, meter.name) is not None:
                raise Problem(METER_EXISTS, f"a meter {meter.name!r} exists (archived ones too)")
            saved = await meter_store.save(conn, meter, ACTOR, None)
            await accounts.audit(conn, ACTOR, "meter.created", meter.name, version=saved.version)
        return await changed(saved)

    @api.get("/meters/{name}", summary="One meter", responses=problem_responses(404, 422))
    async def get_meter(name: MeterName) -> CatalogMeter:
        async with pool.connection() as conn:
            return _out(await _existing(conn, name))

    @api.put(
        "/meters/{name}",
        summary="Create or change a meter, as a new version",
        responses=problem_responses(409, 422),
    )
    async def put_meter(name: MeterName, meter: Meter) -> CatalogMeter:
        if meter.name != name:
            raise invalid_field("body.name", f"must be the meter of the path, {name!r}")
        async with pool.connection() as conn:
            before = await meter_store.find(conn, name)
            if before is not None:
                await _may_change(conn, redis, before, meter)
            saved = await meter_store.save(conn, meter, ACTOR, before)
            action = "meter.created" if before is None else "meter.changed"
            await accounts.audit(conn, ACTOR, action, name, version=saved.version)
        return await changed(saved)

    @api.delete(
        "/meters/{name}",
        summary="Archive a meter: it stops counting; its history stays",
        responses=problem_responses(404, 409, 422),
    )
    async def archive_meter(name: MeterName) -> CatalogMeter:
        async with pool.connection() as conn:
            stored = await _existing(conn, name)
            if stored.archived:
                return _out(stored)
            if plans := await meter_store.plans_using(conn, name):
                raise Problem(
                    METER_IN_USE,
                    f"plans {', '.join(plans)} price or limit meter {name!r}: change them first",
                )
            version = await meter_store.archive(conn, stored, ACTOR)
            await accounts.audit(conn, ACTOR, "meter.archived", name, version=version)
            archived = await _existing(conn, name)
        return await changed(archived)

    @api.get(
        "/meters/{name}/versions",
        summary="A meter's history: who changed what, when",
        responses=problem_responses(404, 422),
    )
    async def meter_versions(name: MeterName) -> History:
        async with pool.connection() as conn:
            rows = await meter_store.versions(conn, name)
        if not rows:
            raise Problem(UNKNOWN_METER, f"no meter {name!r}")
        return history(rows)

    return api


async def _existing(conn: Any, name: str) -> StoredMeter:
    stored = await meter_store.find(conn, name)
    if stored is None:
        raise Problem(UNKNOWN_METER, f"no meter {name!r}")
    return stored


async def _may_change(conn: Any, redis: Redis, before: StoredMeter, meter: Meter) -> None:
    """Refuse a change that would rewrite what an archived meter or one that has counted
    events counted (its rollups, or any customer's live counters)."""
    if before.archived:
        raise Problem(METER_EXISTS, f"meter {meter.name!r} is archived; names are not reused")
    if before.meter.counting_definition() == meter.counting_definition():
        return
    if await meter_store.has_rollups(conn, meter.name) or await _counted(redis, meter.name):
        changed = sorted(
            k
            for k, v in meter.counting_definition().items()
            if before.meter.counting_definition()[k] != v
        )
        raise Problem(
            METER_LOCKED,
            f"meter {meter.name!r} has counted events: changing its {', '.join(changed)}"
            " would rewrite them. Create a new meter, move the plans to it and archive this"
            " one; group_by, description and unit may change in place",
        )


async def _counted(redis: Redis, name: str) -> bool:
    """Has an aggregator counted events of ``name`` (``redis_keys.COUNTED_METERS``)?"""
    return bool(await redis.sismember(redis_keys.COUNTED_METERS, name))
