"""A top N ranked in Redis (``rank_buckets.lua``) against the same top from every group.

The script narrows with doubles; the API ranks what it returns exactly.  Random buckets
of random groups — values far beyond 2^53 micro-units that doubles cannot tell apart,
negative ones, ties, groups missing from some buckets, keys missing — go into the real
Redis; the ranked read must give the same top, the same values and the same points as
reading every group and ranking in Python.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.catalog import Aggregation
from schemas.windows import Window, bucket_id
from services.api.usage import ranking
from services.api.usage.reader import Cells, UsageReader
from tests.conftest import REDIS_URL
from tests.unit.test_usage_ranking import meter

HOUR = timedelta(hours=1)
BIG = 2**62  # beyond 2^53: doubles near BIG are 1,024 apart
value = st.one_of(
    st.integers(-5, 50),
    st.integers(BIG - 3, BIG + 3),
    st.integers(BIG - 2000, BIG + 2000),
    st.integers(-(2**63), 2**63 - 1),
)
# Per hour (oldest first): None for no key, else each group's value if it has one.
Hours = list[dict[str, int] | None]
hours = st.lists(
    st.none() | st.dictionaries(st.sampled_from("abcdefghij"), value, max_size=10),
    min_size=1,
    max_size=6,
)
RANKED = [Aggregation.COUNT, Aggregation.SUM, Aggregation.MAX, Aggregation.MIN, Aggregation.LATEST]


def store(customer: str, start: datetime, per_hour: Hours) -> None:
    """The hours' counter hashes as the aggregator leaves them: the groups, a total and
    (for latest values) a time per group."""
    client = SyncRedis.from_url(REDIS_URL)
    for n, groups in enumerate(per_hour):
        if groups is None:
            continue
        key = redis_keys.counters(
            customer, "m", Window.HOUR, bucket_id(Window.HOUR, start + n * HOUR)
        )
        cells: dict[str, int] = {redis_keys.TOTAL: 7}
        for name, micros in groups.items():
            field = redis_keys.group_field((f"/{name}",))
            cells[field] = micros
            cells[field + redis_keys.TIME_SUFFIX] = 10**12 + n
        client.hset(key, mapping=cells)  # type: ignore[arg-type]  # ints are fine
        client.expire(key, 600)
    client.close()


async def both(
    customer: str, aggregation: Aggregation, start: datetime, count: int, limit: int
) -> tuple[Cells, Cells]:
    """The hours read ranked and read whole; hours need no rollups, so the pool stays
    closed."""
    redis = Redis.from_url(REDIS_URL)
    reader = UsageReader(redis, AsyncConnectionPool("", open=False))
    now = start + count * HOUR
    args = (customer, meter(aggregation), Window.HOUR, start, now, True, now)
    try:
        return await reader.read(*args, limit), await reader.read(*args)
    finally:
        await redis.aclose()


def answer(aggregation: Aggregation, cells: Cells, limit: int) -> tuple[object, object]:
    top = ranking.top(meter(aggregation), cells, limit)
    points = cells.points(meter(aggregation), True, [t.field for t in top])
    return [(t.field, t.value) for t in top], points


NEAR_TIES: Hours = [{"a": BIG, "b": BIG + 1, "c": BIG - 1}, {"a": 1, "b": 0, "c": 2}]
# In doubles a adds up to BIG, b to BIG + 1,024: exactly, a is the larger.
REVERSED: Hours = [{"a": BIG + 500, "b": BIG + 600}, {"a": 200}]


@settings(max_examples=300, deadline=None)
@given(aggregation=st.sampled_from(RANKED), limit=st.integers(1, 4), per_hour=hours)
@example(Aggregation.SUM, 1, NEAR_TIES)
@example(Aggregation.SUM, 2, NEAR_TIES)
@example(Aggregation.SUM, 1, REVERSED)
@example(Aggregation.LATEST, 1, [{"a": 5, "b": 1}, {"b": 2}, None])
@example(Aggregation.MIN, 1, [{"a": -(2**63), "b": -(2**63) + 1}])
def test_the_ranked_read_gives_the_top_of_every_group(
    aggregation: Aggregation, limit: int, per_hour: Hours
) -> None:
    customer = f"top-{uuid.uuid4().hex[:12]}"
    start = datetime(2026, 12, 1, tzinfo=UTC)
    store(customer, start, per_hour)
    ranked, whole = asyncio.run(both(customer, aggregation, start, len(per_hour), limit))
    assert answer(aggregation, ranked, limit) == answer(aggregation, whole, limit)
    assert set(ranked.found) == set(whole.found)  # an hour without a key stays absent


def test_the_ranked_read_brings_back_only_the_groups_that_can_rank() -> None:
    customer = f"top-{uuid.uuid4().hex[:12]}"
    start = datetime(2026, 12, 1, tzinfo=UTC)
    groups = {name: (n + 1) * 1000 for n, name in enumerate("abcdefghij")}
    store(customer, start, [groups, groups, groups])
    ranked, whole = asyncio.run(both(customer, Aggregation.SUM, start, 3, 3))
    assert [sorted(cells) for cells in ranked.found.values()] == [
        ['["/h"]', '["/i"]', '["/j"]']
    ] * 3
    assert all(len(cells) == 11 for cells in whole.found.values())  # ten groups and the total


def test_ten_thousand_tied_groups_are_all_read_back() -> None:
    """Ties keep every tied group (the API breaks them), and Lua unpacks a few thousand
    values at most: the script reads them back in chunks, not in one HMGET."""
    customer = f"top-{uuid.uuid4().hex[:12]}"
    start = datetime(2026, 12, 1, tzinfo=UTC)
    tied = {f"u{n:05d}": 1 for n in range(10_000)}
    store(customer, start, [tied, None, tied])
    ranked, whole = asyncio.run(both(customer, Aggregation.SUM, start, 3, 5))
    assert answer(Aggregation.SUM, ranked, 5) == answer(Aggregation.SUM, whole, 5)
    assert [len(cells) for cells in ranked.found.values()] == [10_000, 10_000]
