"""The ClickHouse sink: every event of a batch, as one insert.

Idempotent by construction: the table collapses rows with the same (customer, source,
id), so writing a replayed batch again changes nothing that FINAL reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import orjson

from schemas.envelope import StoredEvent
from services.common.clickhouse import ClickHouse

COLUMNS = ("customer", "type", "source", "id", "time", "value", "dimensions", "received_at")


class ClickHouseSink:
    """Given the client, or a future of it: the aggregator opens chDB (~0.4 s of loading
    a large library) on a thread while its consumer group joins, and a write waits for
    it, so a restarted aggregator does not pay the two one after the other."""

    def __init__(self, client: ClickHouse | asyncio.Future[ClickHouse]) -> None:
        self._client = client

    async def write(self, events: Sequence[StoredEvent]) -> None:
        if events:
            rows = encode(events)
            client = await self._opened()
            await asyncio.to_thread(client.insert, f"{client.database}.events", COLUMNS, rows)

    async def _opened(self) -> ClickHouse:
        if isinstance(self._client, asyncio.Future):
            self._client = await self._client
        return self._client


def encode(events: Iterable[StoredEvent]) -> bytes:
    """JSONEachRow input as one JSON array: a single orjson call for the whole batch."""
    return orjson.dumps(
        [
            {
                "customer": e.customer,
                "type": e.type,
                "source": e.source,
                "id": e.id,
                "time": e.time,
                "value": str(e.value),
                "dimensions": e.dimensions,
                "received_at": e.received_at,
            }
            for e in events
        ]
    )
