"""Meters as versioned data: the one writer of ``meters``, ``meter_versions`` and
``catalog_version``.

Every change is a new version of the meter, kept with who made it, and bumps the catalog
version in the same transaction (migration 0009): processes read the version with the
meters, ingest stamps it on events, and a change to how a meter counts sets its
``counting_from`` to that version, so the live counters count only events stamped since
and the back-fill the ones before.  The NOTIFY trigger of migration 0006 tells every
process to reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from schemas.catalog import Meter
from services.common.catalog import METER_COLUMNS


@dataclass(frozen=True, slots=True)
class StoredMeter:
    meter: Meter
    version: int
    counting_from: int
    archived: bool
    created_at: datetime
    updated_at: datetime


async def find(conn: AsyncConnection, name: str, lock: bool = False) -> StoredMeter | None:
    """A meter as stored, archived or not (``lock``: until the transaction ends)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {METER_COLUMNS}, version, counting_from, archived, created_at,"
            f" updated_at FROM meters WHERE name = %s{' FOR UPDATE' if lock else ''}",
            (name,),
        )
        row = await cur.fetchone()
    return None if row is None else _stored(row)


async def every(conn: AsyncConnection) -> list[StoredMeter]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {METER_COLUMNS}, version, counting_from, archived, created_at,"
            " updated_at FROM meters ORDER BY name"
        )
        return [_stored(row) for row in await cur.fetchall()]


def _stored(row: dict[str, Any]) -> StoredMeter:
    names = ("version", "counting_from", "archived", "created_at", "updated_at")
    extra = {k: row.pop(k) for k in names}
    return StoredMeter(meter=Meter.model_validate(row), **extra)


async def save(
    conn: AsyncConnection, meter: Meter, actor: str, before: StoredMeter | None
) -> StoredMeter:
    """Create ``meter`` or replace ``before`` with it, as a new version.  Its
    ``counting_from`` moves to the new catalog version when it is new or counts
    differently; the caller has checked that this rewrites no history."""
    async with conn.transaction():
        catalog = await _bump(conn)
        recounts = before is None or (
            before.meter.counting_definition() != meter.counting_definition()
        )
        counting_from = catalog if recounts else before.counting_from  # type: ignore[union-attr]
        values = _columns(meter)
        cur = await conn.execute(
            """
            INSERT INTO meters (name, description, event_type, aggregation, value_property,
                                group_by, filters, unit, counting_from)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (name) DO UPDATE SET
                description = excluded.description, event_type = excluded.event_type,
                aggregation = excluded.aggregation, value_property = excluded.value_property,
                group_by = excluded.group_by, filters = excluded.filters,
                unit = excluded.unit, counting_from = excluded.counting_from,
                version = meters.version + 1, updated_at = now()
            RETURNING version, created_at, updated_at
            """,
            (*values, counting_from),
        )
        row = await cur.fetchone()
        assert row is not None
        await _record(conn, meter, row[0], actor)
    return StoredMeter(meter, row[0], counting_from, False, row[1], row[2])


async def archive(conn: AsyncConnection, stored: StoredMeter, actor: str) -> int:
    """Stop ``stored`` counting, keeping its history; returns its new version."""
    async with conn.transaction():
        await _bump(conn)
        cur = await conn.execute(
            "UPDATE meters SET archived = true, version = version + 1, updated_at = now()"
            " WHERE name = %s RETURNING version",
            (stored.meter.name,),
        )
        row = await cur.fetchone()
        assert row is not None
        await _record(conn, stored.meter, row[0], actor, archived=True)
    return int(row[0])


async def seed(conn: AsyncConnection, meters: list[Meter]) -> None:
    """Add the catalog file's meters the database lacks; leave the others as the admin
    API left them (a restart must not undo an edit).  Seeded meters count from version 0:
    every event, however stamped (the catalog's own meters, there from the start)."""
    for meter in meters:
        cur = await conn.execute(
            """
            INSERT INTO meters (name, description, event_type, aggregation, value_property,
                                group_by, filters, unit)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (name) DO NOTHING
            RETURNING version
            """,
            _columns(meter),
        )
        if (row := await cur.fetchone()) is not None:
            await _record(conn, meter, row[0], "catalog")


async def plans_using(conn: AsyncConnection, name: str) -> list[str]:
    """Plans (not archived) that price, limit or alert on the meter."""
    cur = await conn.execute(
        "SELECT id FROM plans WHERE NOT archived AND (definition->'prices' ? %s"
        " OR definition->'quotas' ? %s) ORDER BY id",
        (name, name),
    )
    return [row[0] for row in await cur.fetchall()]


async def versions(conn: AsyncConnection, name: str) -> list[tuple[Any, ...]]:
    """A meter's history, oldest first: (version, definition, changed_by, changed_at)."""
    cur = await conn.execute(
        "SELECT version, definition, changed_by, changed_at FROM meter_versions"
        " WHERE name = %s ORDER BY version",
        (name,),
    )
    return list(await cur.fetchall())


async def has_rollups(conn: AsyncConnection, name: str) -> bool:
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM usage_daily WHERE meter = %s)"
        " OR EXISTS (SELECT 1 FROM usage_monthly WHERE meter = %s)",
        (name, name),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _bump(conn: AsyncConnection) -> int:
    """The next catalog version; the row lock serialises meter changes until commit."""
    cur = await conn.execute("UPDATE catalog_version SET version = version + 1 RETURNING version")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _record(
    conn: AsyncConnection, meter: Meter, version: int, actor: str, archived: bool = False
) -> None:
    definition = meter.model_dump(mode="json", by_alias=True) | {"archived": archived}
    await conn.execute(
        "INSERT INTO meter_versions (name, version, definition, changed_by)"
        " VALUES (%s, %s, %s, %s)",
        (meter.name, version, Jsonb(definition), actor),
    )


def _columns(meter: Meter) -> tuple[Any, ...]:
    return (
        meter.name,
        meter.description,
        meter.event_type,
        meter.aggregation.value,
        meter.value_property,
        list(meter.group_by),
        Jsonb(meter.model_dump(mode="json", by_alias=True)["filters"]),
        meter.unit,
    )
