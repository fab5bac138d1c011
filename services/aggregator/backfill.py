"""Back-filling a new meter's live counters from the events stored before it counted.

A meter created at catalog version v counts live only events ingest stamped v or later
(``increments.build``'s ``counting_from``); the events stamped before are in ClickHouse
with their stamps.  This reads them (FINAL: each once), turns them into counter
operations with the same ``increments`` code the aggregator runs, and applies them per
customer with the same Lua call — under an offset field of their own
(``backfill/<meter>@<v>``), so one customer's back-fill is applied exactly once: a second
run, or a crashed one resumed, finds the field and adds nothing.  The two sets of events
are disjoint by their stamps, so live + back-filled is the meter's exact total.  Only
buckets still kept in Redis are written (``increments`` drops the others); rollups cover
history (``tally billing rollup``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from schemas.catalog import Meter
from schemas.envelope import StoredEvent
from schemas.windows import RETENTION, Window, bucket_start
from services.aggregator import increments
from services.aggregator.redis_sink import Apply, Outcome, RedisSink
from services.common.clickhouse import ClickHouse
from services.common.zone_book import ZoneOf, in_utc

_TS = "DateTime64(6, 'UTC')"


@dataclass(frozen=True, slots=True)
class BackfillReport:
    customers: int  # customers whose counters gained the history
    events: int  # events counted into them
    already: int  # customers back-filled by an earlier run


def offset_field(meter: Meter, counting_from: int) -> str:
    return f"backfill/{meter.name}@{counting_from}"


async def backfill_live(
    clickhouse: ClickHouse,
    redis: RedisSink,
    meter: Meter,
    counting_from: int,
    now: datetime,
    zone_of: ZoneOf = in_utc,
) -> BackfillReport:
    """Add to ``meter``'s live counters the events stamped before ``counting_from`` (and
    to its quota months in each customer's billing zone, ``zone_of``)."""
    since = bucket_start(Window.MONTH, now - RETENTION[Window.MONTH])
    customers = await _query(
        clickhouse,
        "SELECT DISTINCT customer FROM {db}.events WHERE type = {type:String}"
        f" AND catalog_version < {{version:UInt64}} AND time >= {{since:{_TS}}}"
        " ORDER BY customer",
        meter,
        counting_from,
        since,
    )
    done = events = already = 0
    for (customer,) in customers:
        found = await _events(clickhouse, meter, counting_from, since, customer)
        meters = {meter.event_type: [meter]}
        ops = increments.build(customer, found, meters, now, tz=zone_of(customer))
        apply = Apply(customer, offset_field(meter, counting_from), None, 1, [], 0, [], ops)
        [reply] = await redis.apply([apply])
        if reply.outcome is Outcome.APPLIED:
            done, events = done + 1, events + len(found)
        elif reply.outcome is Outcome.OFFSET_MOVED:
            already += 1
        else:
            raise RuntimeError(f"{customer}: counters refused the back-fill ({reply.outcome})")
    return BackfillReport(done, events, already)


async def _events(
    clickhouse: ClickHouse, meter: Meter, counting_from: int, since: datetime, customer: str
) -> list[StoredEvent]:
    rows = await _query(
        clickhouse,
        "SELECT source, id, toString(time), toString(value), dimensions, data,"
        " toString(received_at) FROM {db}.events FINAL WHERE customer = {customer:String}"
        " AND type = {type:String} AND catalog_version < {version:UInt64}"
        f" AND time >= {{since:{_TS}}}",
        meter,
        counting_from,
        since,
        customer=customer,
    )
    return [
        StoredEvent(
            id=ident,
            source=source,
            type=meter.event_type,
            customer=customer,
            time=_moment(time),
            value=Decimal(value),
            dimensions=dimensions,
            received_at=_moment(received_at),
            data=data,
        )
        for source, ident, time, value, dimensions, data, received_at in rows
    ]


async def _query(
    clickhouse: ClickHouse,
    sql: str,
    meter: Meter,
    counting_from: int,
    since: datetime,
    **params: Any,
) -> list[list[Any]]:
    bound = {
        "type": meter.event_type,
        "version": counting_from,
        "since": since.strftime("%Y-%m-%d %H:%M:%S.%f"),
        **params,
    }
    text = sql.replace("{db}", clickhouse.database)
    return await asyncio.to_thread(clickhouse.query, text, bound)


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)
