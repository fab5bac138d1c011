"""Property tests: the pre-aggregated counter operations against a naive model.

For any set of one customer's events, what ``increments.build`` asks Redis to do for a
bucket must equal what a plain per-event computation of the meter gives: counts, exact
decimal sums, maxima, the latest value by event time, distinct members.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import redis_keys
from schemas.catalog import Aggregation, DimensionFilter, Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, to_micros, utcnow
from schemas.windows import Window, bucket_id
from services.aggregator.increments import CounterOps, build

NOW = utcnow()
CUSTOMER = "prop"
METERS = {
    aggregation: Meter(
        name=f"m_{aggregation.value}",
        event_type="e",
        aggregation=aggregation,
        value_property="user" if aggregation is Aggregation.UNIQUE_COUNT else "value",
    )
    for aggregation in Aggregation
}

values = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False)
events = st.lists(
    st.builds(
        lambda i, offset, value, user: StoredEvent(
            f"id{i}",
            "s",
            "e",
            CUSTOMER,
            NOW - timedelta(seconds=offset),
            value,
            {"user": user},
            NOW,
        ),
        st.integers(0, 10**9),
        st.integers(0, 7200),
        values,
        st.sampled_from(["ann", "bob", "cy", "dee"]),
    ),
    min_size=1,
    max_size=60,
    unique_by=lambda e: str(e.id),
)


def naive(aggregation: Aggregation, chosen: list[StoredEvent]) -> object:
    if aggregation is Aggregation.COUNT:
        return len(chosen) * VALUE_SCALE
    if aggregation is Aggregation.SUM:
        return to_micros(sum((e.value for e in chosen), Decimal(0)))
    if aggregation is Aggregation.MAX:
        return to_micros(max(e.value for e in chosen))
    if aggregation is Aggregation.MIN:
        return to_micros(min(e.value for e in chosen))
    if aggregation is Aggregation.AVG:
        return (to_micros(sum((e.value for e in chosen), Decimal(0))), len(chosen) * VALUE_SCALE)
    if aggregation is Aggregation.LATEST:
        latest = max(e.time for e in chosen)
        return to_micros([e.value for e in chosen if e.time == latest][-1])
    return {e.dimensions["user"] for e in chosen}


def planned(ops: CounterOps, meter: Meter, window: Window, moment: datetime) -> object:
    key = redis_keys.counters(CUSTOMER, meter.name, window, bucket_id(window, moment))
    slot = (key, redis_keys.TOTAL)
    if meter.aggregation in (Aggregation.COUNT, Aggregation.SUM):
        return int(ops.sums[slot])
    if meter.aggregation is Aggregation.MAX:
        return ops.maxima[slot]
    if meter.aggregation is Aggregation.MIN:
        return ops.minima[slot]
    if meter.aggregation is Aggregation.AVG:
        return (ops.sums[slot], ops.sums[(key, redis_keys.count_field(redis_keys.TOTAL))])
    if meter.aggregation is Aggregation.LATEST:
        return ops.latest[slot][1]
    unique = redis_keys.unique_set(CUSTOMER, meter.name, window, bucket_id(window, moment), "*")
    return ops.members[(unique, key, redis_keys.TOTAL)]


@settings(max_examples=150, deadline=None)
@given(batch=events, aggregation=st.sampled_from(list(Aggregation)))
def test_every_bucket_matches_the_naive_meter(
    batch: list[StoredEvent], aggregation: Aggregation
) -> None:
    meter = METERS[aggregation]
    ops = build(CUSTOMER, batch, {"e": [meter]}, NOW)
    for window in Window:
        for bucket in {bucket_id(window, e.time) for e in batch}:
            chosen = [e for e in batch if bucket_id(window, e.time) == bucket]
            assert planned(ops, meter, window, chosen[0].time) == naive(aggregation, chosen)


LLM = Meter(
    name="llm_input",
    event_type="e",
    aggregation=Aggregation.SUM,
    value_property="$.tokens.input",
    group_by=("$.model",),
    filters={"$.region": DimensionFilter.model_validate({"in": ["eu", "uk"]})},
)
nested_events = st.lists(
    st.builds(
        lambda i, offset, tokens, model, region, version: StoredEvent(
            f"id{i}",
            "s",
            "e",
            CUSTOMER,
            NOW - timedelta(seconds=offset),
            Decimal(1),
            {},
            NOW,
            data=orjson.dumps(
                {
                    "tokens": {"input": tokens},
                    **({"model": model} if model else {}),
                    "region": region,
                }
            ).decode(),
            catalog_version=version,
        ),
        st.integers(0, 10**9),
        st.integers(0, 7200),
        st.one_of(st.integers(0, 10**6), st.just("many"), st.none()),
        st.sampled_from(["gpt-4o", "mini", None]),
        st.sampled_from(["eu", "uk", "us"]),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda e: str(e.id),
)


@settings(max_examples=100, deadline=None)
@given(batch=nested_events, counting_from=st.integers(0, 3))
def test_nested_paths_filters_and_catalog_versions_match_a_naive_reading(
    batch: list[StoredEvent], counting_from: int
) -> None:
    ops = build(CUSTOMER, batch, {"e": [LLM]}, NOW, {LLM.name: counting_from})
    expected: dict[tuple[str, str], int] = {}
    for event in batch:
        data = orjson.loads(event.data)
        tokens = data["tokens"]["input"]
        counted = (
            event.catalog_version >= counting_from
            and data["region"] in ("eu", "uk")
            and isinstance(tokens, int)
        )
        if not counted:
            continue
        key = redis_keys.counters(CUSTOMER, LLM.name, Window.DAY, bucket_id(Window.DAY, event.time))
        for group in (redis_keys.TOTAL, redis_keys.group_field((data.get("model") or "",))):
            expected[(key, group)] = expected.get((key, group), 0) + tokens * VALUE_SCALE
    assert {slot: v for slot, v in ops.sums.items() if _is_day(slot[0])} == expected


def _is_day(key: str) -> bool:
    return any(
        key == redis_keys.counters(CUSTOMER, LLM.name, Window.DAY, bucket_id(Window.DAY, d))
        for d in (NOW, NOW - timedelta(days=1))
    )
