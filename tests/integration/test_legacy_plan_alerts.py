"""Plans stored before plans had default alerts take the catalog's when it is loaded
again; a plan whose alerts an admin turned off keeps them off."""

from __future__ import annotations

import uuid
from decimal import Decimal

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Catalog
from services.api.catalog import store
from services.common.catalog import read_plan


async def test_a_plan_stored_without_alerts_takes_the_catalogs(pool: AsyncConnectionPool) -> None:
    default = Catalog.default()
    starter = next(p for p in default.plans if p.id == "starter")
    legacy, silenced = (starter.model_copy(update={"id": f"p{uuid.uuid4().hex[:8]}"}) for _ in "ab")
    async with pool.connection() as conn:
        old = legacy.model_dump(mode="json")
        del old["alerts"]  # as stored before plans had alerts
        off = silenced.model_dump(mode="json") | {"alerts": {"percent": []}}  # an admin's "none"
        for plan_id, definition in ((legacy.id, old), (silenced.id, off)):
            await conn.execute(
                "INSERT INTO plans (id, version, definition) VALUES (%s, 1, %s)",
                (plan_id, Jsonb(definition)),
            )
    catalog = default.model_copy(update={"plans": [legacy, silenced]})
    for _ in range(2):  # a second load changes nothing more
        await store.load(pool, catalog)
    async with pool.connection() as conn:
        upgraded, kept = await read_plan(conn, legacy.id), await read_plan(conn, silenced.id)
        cur = await conn.execute(
            "SELECT id, version FROM plans WHERE id IN (%s, %s)", (legacy.id, silenced.id)
        )
        versions: dict[str, int] = dict(await cur.fetchall())
    assert upgraded is not None and kept is not None
    assert upgraded.alerts.percent == (Decimal(80), Decimal(90), Decimal(100))
    assert upgraded.model_dump() == legacy.model_dump()
    assert kept.alerts.percent == ()
    assert versions == {legacy.id: 2, silenced.id: 1}
