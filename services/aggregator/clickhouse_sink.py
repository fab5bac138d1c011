"""The ClickHouse sink: events as rows of one insert.

Idempotent by construction: the table collapses rows with the same (customer, source,
id), so writing a replayed batch again changes nothing that FINAL reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import orjson

from schemas.envelope import StoredEvent
from services.common.clickhouse import ClickHouse

COLUMNS = (
    "customer",
    "type",
    "source",
    "id",
    "time",
    "value",
    "dimensions",
    "data",
    "catalog_version",
    "received_at",
)


class ClickHouseSink:
    def __init__(self, client: ClickHouse) -> None:
        self._client = client
        self._table = f"{client.database}.events"

    async def write(self, events: Sequence[StoredEvent]) -> None:
        if events:
            await self.insert(encode(events))

    async def insert(self, rows: bytes) -> None:
        """Insert rows ``encode`` made (or ``joined``), in a thread: chDB and the server
        client leave the event loop free meanwhile."""
        await asyncio.to_thread(self._client.insert, self._table, COLUMNS, rows)


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
                "data": e.data,
                "catalog_version": e.catalog_version,
                "received_at": e.received_at,
            }
            for e in events
        ]
    )


def joined(chunks: Sequence[bytes]) -> bytes:
    """Several ``encode`` arrays as one (empty ones left out)."""
    if len(chunks) == 1:
        return chunks[0]
    return b"[" + b",".join(c[1:-1] for c in chunks if len(c) > 2) + b"]"
