"""The meters the aggregator applies, refreshed from PostgreSQL in the background.

A meter added or changed in the catalog takes effect within ``refresh_seconds`` without
a restart.  Lookups are by event type: the hot path is one dict access per event.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Meter
from services.common import catalog
from services.common.logging import get_logger

log = get_logger("tally.aggregator.meters")


class MeterCache:
    def __init__(self, pool: AsyncConnectionPool, refresh_seconds: float) -> None:
        self._pool = pool
        self._refresh_seconds = refresh_seconds
        self._by_type: dict[str, list[Meter]] = {}
        self._task: asyncio.Task[None] | None = None

    def by_type(self) -> dict[str, list[Meter]]:
        return self._by_type

    async def refresh(self) -> None:
        index: dict[str, list[Meter]] = defaultdict(list)
        for meter in await catalog.read_meters(self._pool):
            index[meter.event_type].append(meter)
        self._by_type = dict(index)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="meter-refresh")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last good meters; the pipeline goes on
                log.warning("meter refresh failed", error=repr(exc))
