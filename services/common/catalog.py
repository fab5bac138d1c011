"""The catalog in PostgreSQL: loaded from YAML, read by every service."""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Catalog, Meter


async def load(pool: AsyncConnectionPool, catalog: Catalog) -> None:
    """Upsert the catalog's meters; meters absent from the file are left as they are."""
    async with pool.connection() as conn:
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
