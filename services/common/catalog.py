"""The catalog as every service reads it: meters and plans, from PostgreSQL.

Read-only: ``services.api.catalog`` is the one owner that writes it (seeding from the YAML
catalog, and the admin API's versioned plan changes).
"""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Meter
from schemas.plans import Plan


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


async def read_plan(conn: AsyncConnection, plan_id: str) -> Plan | None:
    cur = await conn.execute("SELECT definition FROM plans WHERE id = %s", (plan_id,))
    row = await cur.fetchone()
    return Plan.model_validate(row[0]) if row else None


async def read_plans(conn: AsyncConnection) -> list[Plan]:
    cur = await conn.execute("SELECT definition FROM plans WHERE NOT archived ORDER BY id")
    return [Plan.model_validate(row[0]) for row in await cur.fetchall()]
