"""The catalog in PostgreSQL: loaded from YAML, read by every service.

Meters follow the file.  Plans are seeded from it: a plan the database lacks is added,
and from then on the admin API owns it (a restart must not undo an admin's edit).
Every plan change is a new version, kept with who made it.
"""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Catalog, Meter
from schemas.plans import Plan

SEEDED_BY = "catalog"


async def load(pool: AsyncConnectionPool, catalog: Catalog) -> None:
    """Upsert the catalog's meters (meters absent from the file are left as they are),
    then add the plans the database does not have yet."""
    async with pool.connection() as conn:
        await _load_meters(conn, catalog)
        for plan in catalog.plans:
            if await read_plan(conn, plan.id) is None:
                await save_plan(conn, plan, SEEDED_BY)


async def _load_meters(conn: AsyncConnection, catalog: Catalog) -> None:
    for meter in catalog.meters:
        await conn.execute(
            """
            INSERT INTO meters (name, description, event_type, aggregation,
                                value_property, group_by, unit)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (name) DO UPDATE SET
                description = excluded.description,
                event_type = excluded.event_type,
                aggregation = excluded.aggregation,
                value_property = excluded.value_property,
                group_by = excluded.group_by,
                unit = excluded.unit,
                updated_at = now()
            WHERE (meters.description, meters.event_type, meters.aggregation,
                   meters.value_property, meters.group_by, meters.unit)
               IS DISTINCT FROM
                  (excluded.description, excluded.event_type, excluded.aggregation,
                   excluded.value_property, excluded.group_by, excluded.unit)
            """,
            (
                meter.name,
                meter.description,
                meter.event_type,
                meter.aggregation.value,
                meter.value_property,
                list(meter.group_by),
                meter.unit,
            ),
        )


async def meters(conn: AsyncConnection) -> list[Meter]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT name, description, event_type, aggregation, value_property, group_by, unit"
            " FROM meters ORDER BY name"
        )
        return [Meter.model_validate(row) for row in await cur.fetchall()]


async def read_meters(pool: AsyncConnectionPool) -> list[Meter]:
    async with pool.connection() as conn:
        return await meters(conn)


async def save_plan(conn: AsyncConnection, plan: Plan, actor: str) -> int:
    """Create or replace a plan as a new version; returns the version number."""
    definition = Jsonb(plan.model_dump(mode="json"))
    async with conn.transaction():
        cur = await conn.execute(
            """
            INSERT INTO plans (id, version, definition) VALUES (%s, 1, %s)
            ON CONFLICT (id) DO UPDATE SET
                version = plans.version + 1, definition = excluded.definition,
                archived = false, updated_at = now()
            RETURNING version
            """,
            (plan.id, definition),
        )
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(
            "INSERT INTO plan_versions (plan_id, version, definition, changed_by)"
            " VALUES (%s, %s, %s, %s)",
            (plan.id, row[0], definition, actor),
        )
    return int(row[0])


async def read_plan(conn: AsyncConnection, plan_id: str) -> Plan | None:
    cur = await conn.execute("SELECT definition FROM plans WHERE id = %s", (plan_id,))
    row = await cur.fetchone()
    return Plan.model_validate(row[0]) if row else None


async def read_plans(conn: AsyncConnection) -> list[Plan]:
    cur = await conn.execute("SELECT definition FROM plans WHERE NOT archived ORDER BY id")
    return [Plan.model_validate(row[0]) for row in await cur.fetchall()]
