"""The catalog as every service reads it: meters and plans, from PostgreSQL.

Read-only: ``services.api.catalog`` is the one owner that writes it (seeding from the YAML
catalog, and the admin API's versioned plan changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Meter
from schemas.plans import Plan

METER_COLUMNS = (
    "name, description, event_type, aggregation, value_property, group_by, filters, unit"
)


@dataclass(frozen=True, slots=True)
class Meters:
    """The meters counting now, as of one catalog version, and since which version each
    counts live (``counting_from``); and the archived ones, whose history is still read."""

    meters: list[Meter]
    version: int
    counting_from: dict[str, int]
    archived: list[Meter] = field(default_factory=list)


async def meters(conn: AsyncConnection) -> list[Meter]:
    """The meters counting now (archived ones are not)."""
    return (await current(conn)).meters


async def current(conn: AsyncConnection) -> Meters:
    """The meters and the catalog version, in one snapshot: a version is never read
    beside meters older than it."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {METER_COLUMNS}, counting_from, archived,"
            " (SELECT version FROM catalog_version) AS catalog FROM meters ORDER BY name"
        )
        rows = await cur.fetchall()
        if not rows:
            await cur.execute("SELECT version AS catalog FROM catalog_version")
            found = await cur.fetchone()
            return Meters([], int(found["catalog"]) if found else 0, {})
    version = int(rows[0]["catalog"])
    live: list[Meter] = []
    archived: list[Meter] = []
    counting: dict[str, int] = {}
    for row in rows:
        counting_from, gone = int(row.pop("counting_from")), row.pop("archived")
        row.pop("catalog")
        (archived if gone else live).append(Meter.model_validate(row))
        if not gone:
            counting[row["name"]] = counting_from
    return Meters(live, version, counting, archived)


async def read_meters(pool: AsyncConnectionPool) -> list[Meter]:
    async with pool.connection() as conn:
        return await meters(conn)


async def read_plan(conn: AsyncConnection, plan_id: str) -> Plan | None:
    cur = await conn.execute("SELECT definition FROM plans WHERE id = %s", (plan_id,))
    row = await cur.fetchone()
    return Plan.model_validate(row[0]) if row else None


async def read_plans(conn: AsyncConnection) -> list[Plan]:
    cur = await conn.execute("SELECT definition FROM plans WHERE NOT archived ORDER BY id")
    return [Plan.model_validate(row[0]) for row in await cur.fetchall()]
