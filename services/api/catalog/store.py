"""The catalog's store: the one writer of meters, plans and their versions.

Meters follow the YAML catalog.  Plans are seeded from it: a plan the database lacks is
added, and from then on the admin API owns it (a restart must not undo an admin's edit).
One exception: a plan stored before plans had default alerts has no ``alerts`` at all
(every plan saved since has the key, if only as ``{percent: []}``, an admin's "none"), so
it takes the catalog's, in a new version that keeps everything else as stored.
Every plan change is a new version, kept with who made it.  Every service reads the
catalog through ``services.common.catalog``.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Catalog
from schemas.plans import Plan

SEEDED_BY = "catalog"


async def load(pool: AsyncConnectionPool, catalog: Catalog) -> None:
    """Upsert the catalog's meters (meters absent from the file are left as they are),
    then add the plans the database does not have yet."""
    async with pool.connection() as conn:
        await _load_meters(conn, catalog)
        for plan in catalog.plans:
            stored = await _definition(conn, plan.id)
            if stored is None:
                await save_plan(conn, plan, SEEDED_BY)
            elif "alerts" not in stored and plan.alerts.percent:
                alerts = plan.alerts.model_dump(mode="json")
                await save_plan(conn, Plan.model_validate(stored | {"alerts": alerts}), SEEDED_BY)


async def _definition(conn: AsyncConnection, plan_id: str) -> dict[str, Any] | None:
    """A plan's definition exactly as stored (absent keys stay absent)."""
    cur = await conn.execute("SELECT definition FROM plans WHERE id = %s", (plan_id,))
    row = await cur.fetchone()
    return None if row is None else dict(row[0])


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


async def every_plan(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Every plan with its current version, archived ones too, as stored."""
    cur = await conn.execute("SELECT definition, version, archived FROM plans ORDER BY id")
    return [d | {"version": v, "archived": a} for d, v, a in await cur.fetchall()]


async def versions(conn: AsyncConnection, plan_id: str) -> list[tuple[Any, ...]]:
    """A plan's history, oldest first: (version, definition, changed_by, changed_at)."""
    cur = await conn.execute(
        "SELECT version, definition, changed_by, changed_at FROM plan_versions"
        " WHERE plan_id = %s ORDER BY version",
        (plan_id,),
    )
    return list(await cur.fetchall())
