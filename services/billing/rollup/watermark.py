"""The rollup watermark in PostgreSQL: how far (in ClickHouse ``stored_at``) the
``usage_daily``/``usage_monthly`` rollups are complete: the incremental pass
recomputes only the cells that gained events after it.
"""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool

USAGE = "usage"


async def read(pool: AsyncConnectionPool, name: str = USAGE) -> datetime | None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT watermark FROM rollup_state WHERE name = %s", (name,))
        row = await cur.fetchone()
    return row[0] if row else None


async def write(pool: AsyncConnectionPool, watermark: datetime, name: str = USAGE) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO rollup_state (name, watermark) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET watermark = excluded.watermark",
            (name, watermark),
        )
