"""The catalog's store: the one writer of meters, plans and their versions.

Meters and plans are seeded from the YAML catalog: one the database lacks is added, and
from then on the admin API owns it (a restart must not undo an admin's edit; meters'
versions are ``meter_store``'s).
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
from services.api.catalog import meter_store

SEEDED_BY = "catalog"


async def load(pool: AsyncConnectionPool, catalog: Catalog) -> None:
    """Add the catalog's meters and plans the database does not have yet."""
    async with pool.connection() as conn:
        await meter_store.seed(conn, catalog.meters)
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
