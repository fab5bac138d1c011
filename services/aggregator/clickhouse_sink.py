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
            rows = encode(events)
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
