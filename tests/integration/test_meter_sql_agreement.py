"""The rollups' SQL counts what the live counters count, to the last digit.

Random events — nested data, flat data, legacy rows without ``data``, numbers as JSON
numbers and as strings, missing and malformed values, and corrections of additive and
other meters — go into ClickHouse through the real sink; every aggregation, with paths,
filters and groups, is computed by ``meter_sql`` and by the aggregator's own
``increments.build``, and the two must agree.
"""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from schemas import redis_keys
from schemas.catalog import Aggregation, DimensionFilter, Meter
from schemas.corrections import CorrectionEvent
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, from_micros, utcnow
from schemas.windows import Window, bucket_id
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.increments import build
from services.billing.rollup.meter_sql import meter_sql
from services.common.clickhouse import ClickHouse
from tests.support import clear_of_midnight

NOW = utcnow()
# events from DAY to 30 min after it, all on DAY's day: one bucket, one row per group
DAY = clear_of_midnight(NOW, timedelta(hours=1)) - timedelta(hours=1)
KIND = "llm_call"

METERS = [
    Meter(name="calls", event_type=KIND, aggregation=Aggregation.COUNT, group_by=("$.model",)),
    Meter(
        name="input_tokens",
        event_type=KIND,
        aggregation=Aggregation.SUM,
        value_property="$.tokens.input",
        group_by=("$.model", "region"),
        filters={"$.region": DimensionFilter.model_validate({"in": ["eu", "uk"]})},
    ),
    *(
        Meter(
            name=f"output_{a.value}",
            event_type=KIND,
            aggregation=a,
            value_property="$.tokens.output",
            group_by=("$.model",),
        )
        for a in (Aggregation.MAX, Aggregation.MIN, Aggregation.AVG, Aggregation.LATEST)
    ),
    Meter(
        name="seats",
        event_type=KIND,
        aggregation=Aggregation.UNIQUE_COUNT,
        value_property="$.user.id",
        filters={"$.model": DimensionFilter(prefix="gpt-")},
    ),
    Meter(name="legacy_sum", event_type=KIND, aggregation=Aggregation.SUM, group_by=("region",)),
    Meter(
        name="by_tier",
        event_type=KIND,
        aggregation=Aggregation.COUNT,
        group_by=("$.tier",),
        filters={"$.tier": DimensionFilter.model_validate({"in": ["1.5", "200", "1000"]})},
    ),
    Meter(
        name="tiers",
        event_type=KIND,
        aggregation=Aggregation.UNIQUE_COUNT,
        value_property="$.tier",
        group_by=("$.tier",),
    ),
    Meter(
        name="first_tool",
        event_type=KIND,
        aggregation=Aggregation.COUNT,
        group_by=("$.tools[0]",),
        filters={"$.cached": DimensionFilter(equals="false")},
    ),
]


TIERS: list[Decimal | int] = [
    Decimal(t) for t in ("1.50", "1.5", "15E-1", "200.0", "1E+3", "1E-7", "0.30000000000000004")
]
TIERS += [200, 1000, -(2**63), 2**64 - 1]
"""Numbers as groups: one number written several ways is one group, live and in SQL."""


def _number(rng: random.Random) -> Any:
    return rng.choice(
        [
            rng.randint(0, 10**6),
            str(rng.randint(0, 999)),
            f"{rng.randint(0, 99)}.{rng.randint(0, 10**7)}",
            Decimal(rng.randint(0, 10**9)) / 1000,
            "many",
            " 5",
            -3,
            True,
            None,
        ]
    )


def _event(rng: random.Random, customer: str, index: int) -> StoredEvent:
    model = rng.choice(["gpt-4o", "gpt-mini", "claude", None])
    region = rng.choice(["eu", "uk", "us"])
    time = DAY + timedelta(seconds=rng.randint(0, 1800), microseconds=index)
    value = Decimal(rng.randint(0, 10**6)) / 100
    if rng.random() < 0.25:  # stored flat (legacy rows and flat events alike)
        dims = {"region": region} | ({"model": model} if model else {})
        return StoredEvent(f"e{index}", "s", KIND, customer, time, value, dims, NOW)
    data: dict[str, Any] = {
        "value": value,
        "region": region,
        "tokens": {"input": _number(rng), "output": _number(rng)},
        "user": {"id": rng.choice(["ann", "bob", 7, None])},
        "tools": rng.sample(["search", "code", "math"], rng.randint(0, 2)),
        "cached": rng.choice([True, False]),
        "tier": rng.choice(TIERS),
    }
    if model:
        data["model"] = model
    if rng.random() < 0.2:
        del data["tokens"]
    text = orjson.dumps(data, default=lambda d: orjson.Fragment(str(d))).decode()
    dims = {"region": region} | ({"model": model} if model else {})
    return StoredEvent(f"e{index}", "s", KIND, customer, time, value, dims, NOW, data=text)


def _correction(rng: random.Random, customer: str, index: int) -> StoredEvent:
    """A correction as ingest publishes it (``schemas.corrections``), of a meter with or
    without groups; one of a max meter, which neither count takes."""
    meter = rng.choice(["calls", "input_tokens", "legacy_sum", "first_tool", "output_max"])
    groups = {
        "calls": {"model": rng.choice(["gpt-4o", "claude"])},
        "input_tokens": {"model": "gpt-4o", "region": rng.choice(["eu", "us"])},
        "legacy_sum": {"region": "uk"},
        "first_tool": {"tools[0]": "code"},
        "output_max": {"model": "claude"},
    }[meter]
    delta = Decimal(rng.randint(-(10**6), 10**6)) / 1000 if meter != "calls" else rng.randint(-3, 9)
    time = DAY + timedelta(seconds=rng.randint(0, 1800))
    made = CorrectionEvent(f"c{index}", customer, time, Decimal(delta) or Decimal(1), meter, groups)
    return StoredEvent(
        made.id, made.source, made.type, customer, time, made.value, {}, NOW, data=made.data
    )


def _live(meter: Meter, events: list[StoredEvent], customer: str) -> dict[str, Decimal]:
    """Each group's day value as the aggregator's counter operations hold it."""
    ops = build(customer, events, {KIND: [meter]}, NOW)
    key = redis_keys.counters(customer, meter.name, Window.DAY, bucket_id(Window.DAY, DAY))
    found: dict[str, Decimal] = {}
    if meter.aggregation is Aggregation.UNIQUE_COUNT:
        for (_, counters, group), members in ops.members.items():
            if counters == key:
                found[group] = Decimal(len(members))
        return found
    if meter.aggregation is Aggregation.AVG:
        for (k, group), total in ops.sums.items():
            if k == key and not group.endswith(redis_keys.COUNT_SUFFIX):
                count = ops.sums[(k, redis_keys.count_field(group))]
                found[group] = from_micros(total * VALUE_SCALE // count)
        return found
    table = {
        Aggregation.MAX: ops.maxima,
        Aggregation.MIN: ops.minima,
    }.get(meter.aggregation, ops.sums)
    if meter.aggregation is Aggregation.LATEST:
        table = {slot: v for slot, (_, v) in ops.latest.items()}
    return {group: from_micros(v) for (k, group), v in table.items() if k == key}


def _sql(ch: ClickHouse, meter: Meter, customer: str, grouped: bool) -> dict[str, Decimal]:
    built = meter_sql(meter)
    groups = built.groups if grouped else []
    select = "".join(f", {g}" for g in groups)
    by = "".join(f", {i + 4}" for i in range(len(groups)))
    rows = ch.query(
        f"SELECT customer, toString(toDate(time)), toString({built.value}){select}"
        f" FROM {ch.database}.events FINAL WHERE {built.counted}"
        " AND customer = {customer:String} GROUP BY 1, 2" + by,
        {**built.params, "customer": customer},
    )
    return {
        redis_keys.group_field(tuple(row[3:])) if grouped else redis_keys.TOTAL: Decimal(row[2])
        for row in rows
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rollup_sql_and_live_counters_agree(ch: ClickHouse, tenant: str, seed: int) -> None:
    rng = random.Random(seed)
    customer = f"{tenant}-{seed}"
    events = [_event(rng, customer, i) for i in range(300)]
    events += [_correction(rng, customer, i) for i in range(30)]
    asyncio.run(ClickHouseSink(ch).write(events))
    for meter in METERS:
        live = _live(meter, events, customer)
        expected = (
            {redis_keys.TOTAL: live.pop(redis_keys.TOTAL)} if redis_keys.TOTAL in live else {}
        )
        assert _sql(ch, meter, customer, grouped=False) == expected, meter.name
        if meter.group_by:
            assert _sql(ch, meter, customer, grouped=True) == live, meter.name
