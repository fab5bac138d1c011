from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from schemas import redis_keys
from schemas.catalog import Aggregation, Catalog, Meter
from schemas.envelope import StoredEvent
from schemas.windows import Window, bucket_expiry, bucket_id
from services.aggregator.increments import CounterOps, build

CUSTOMER = "cust_42"
NOW = datetime(2026, 11, 3, 10, 15, 30, tzinfo=UTC)
SEATS = Meter(name="seats", event_type="seats", aggregation=Aggregation.LATEST)


def meters(*extra: Meter) -> dict[str, list[Meter]]:
    by_type: dict[str, list[Meter]] = defaultdict(list)
    for meter in [*Catalog.default().meters, *extra]:
        by_type[meter.event_type].append(meter)
    return dict(by_type)


def event(type_: str, value: str = "1", at: datetime = NOW, i: int = 0, **dims: str) -> StoredEvent:
    return StoredEvent(
        id=f"evt-{i}",
        source="gateway-eu",
        type=type_,
        customer=CUSTOMER,
        time=at,
        value=Decimal(value),
        dimensions=dims,
        received_at=NOW,
    )


def run(*events: StoredEvent) -> CounterOps:
    return build(CUSTOMER, events, meters(SEATS), NOW)


def counters(meter: str, window: Window, at: datetime = NOW) -> str:
    return redis_keys.counters(CUSTOMER, meter, window, bucket_id(window, at))


def test_count_per_window_total_and_endpoint() -> None:
    ops = run(
        event("api_call", "7", endpoint="/v1/x"),  # value is ignored by count
        event("api_call", endpoint="/v1/x"),
        event("api_call", endpoint="/v1/y"),
    )
    x, y = redis_keys.group_field(("/v1/x",)), redis_keys.group_field(("/v1/y",))
    for window in Window:
        key = counters("api_calls", window)
        assert ops.sums[(key, redis_keys.TOTAL)] == 3_000_000
        assert ops.sums[(key, x)] == 2_000_000
        assert ops.sums[(key, y)] == 1_000_000
    assert len(ops.sums) == 3 * len(Window)
    assert not ops.maxima and not ops.latest and not ops.members


def test_count_groups_missing_dimension_as_empty() -> None:
    ops = run(event("api_call"))
    assert ops.sums[(counters("api_calls", Window.DAY), redis_keys.group_field(("",)))] == 1_000_000


def test_sum_is_exact() -> None:
    ops = run(
        event("compute", "0.1"),
        event("compute", "0.2"),
        event("compute", "0.000001"),
        event("compute", "999999999999.999999"),
    )
    for window in Window:
        assert ops.sums[(counters("compute_seconds", window), "*")] == 1_000_000_000_000_300_000
    assert len(ops.sums) == len(Window)  # no group_by: only the total


def test_max_keeps_the_largest() -> None:
    ops = run(event("storage", "3.5"), event("storage", "12.25"), event("storage", "0"))
    for window in Window:
        assert ops.maxima[(counters("storage_gb", window), "*")] == 12_250_000


def test_max_of_zero_is_recorded() -> None:
    ops = run(event("storage", "0"))
    assert ops.maxima[(counters("storage_gb", Window.HOUR), "*")] == 0


def test_latest_keeps_the_value_with_the_latest_event_time() -> None:
    earlier = NOW - timedelta(seconds=20)
    ops = run(event("seats", "10"), event("seats", "4", at=earlier))
    micros_at = int(NOW.timestamp()) * 1_000_000
    for window in Window:
        assert ops.latest[(counters("seats", window), "*")] == (micros_at, 10_000_000)


def test_latest_tie_goes_to_the_later_event_in_the_batch() -> None:
    ops = run(event("seats", "10"), event("seats", "4"))
    assert ops.latest[(counters("seats", Window.MINUTE), "*")][1] == 4_000_000


def test_unique_count_collects_members() -> None:
    ops = run(
        event("user", user="alice"),
        event("user", user="bob"),
        event("user", user="alice"),
        event("user"),  # no `user` dimension: nothing to count
    )
    for window in Window:
        bucket = bucket_id(window, NOW)
        unique = redis_keys.unique_set(CUSTOMER, "active_users", window, bucket, "*")
        key = (unique, counters("active_users", window), "*")
        assert ops.members[key] == {"alice", "bob"}
    assert len(ops.members) == len(Window)
    assert not ops.sums


def test_unique_count_with_group_by() -> None:
    by_plan = Meter(
        name="users_by_plan",
        event_type="user",
        aggregation=Aggregation.UNIQUE_COUNT,
        value_property="user",
        group_by=("plan",),
    )
    ops = build(
        CUSTOMER,
        [event("user", user="alice", plan="pro"), event("user", user="bob", plan="free")],
        {"user": [by_plan]},
        NOW,
    )
    bucket = bucket_id(Window.DAY, NOW)
    key = counters("users_by_plan", Window.DAY)
    pro = redis_keys.group_field(("pro",))
    unique = redis_keys.unique_set(CUSTOMER, "users_by_plan", Window.DAY, bucket, pro)
    assert ops.members[(unique, key, pro)] == {"alice"}
    total = redis_keys.unique_set(CUSTOMER, "users_by_plan", Window.DAY, bucket, "*")
    assert ops.members[(total, key, "*")] == {"alice", "bob"}


def test_events_of_unknown_type_do_nothing() -> None:
    ops = run(event("nobody_meters_this"))
    assert not ops
    assert not ops.expiry


def windows_hit(ops: CounterOps, meter: str) -> set[Window]:
    return {Window(key.split(":")[4]) for key, _ in ops.sums if f":c:{meter}:" in key}


MINUTE_GONE = {Window.HOUR, Window.DAY, Window.MONTH}


@pytest.mark.parametrize(
    ("age", "windows"),
    [
        (timedelta(hours=3), set(Window)),
        (timedelta(hours=3, seconds=30), set(Window)),  # minute 07:15 is kept until 10:16
        (timedelta(hours=3, seconds=31), MINUTE_GONE),  # minute 07:14 expired at 10:15
        (timedelta(hours=3, minutes=1), MINUTE_GONE),
        (timedelta(days=3, hours=1), {Window.DAY, Window.MONTH}),
        (timedelta(days=45), {Window.MONTH}),
    ],
)
def test_expired_buckets_are_skipped(age: timedelta, windows: set[Window]) -> None:
    at = NOW - age
    ops = run(event("compute", "2", at=at))
    assert windows_hit(ops, "compute_seconds") == windows
    for window in windows:
        assert ops.sums[(counters("compute_seconds", window, at), "*")] == 2_000_000


def test_expiry_covers_every_key_touched() -> None:
    old = NOW - timedelta(hours=5)
    ops = run(
        event("api_call", endpoint="/v1/x"),
        event("compute", "1.5", at=old),
        event("storage", "3"),
        event("seats", "2"),
        event("user", user="alice", at=old),
    )
    touched = {key for key, _ in [*ops.sums, *ops.maxima, *ops.latest]}
    touched |= {key for pair in ops.members for key in pair[:2]}
    assert touched == set(ops.expiry)
    for key, expires in ops.expiry.items():
        assert expires > NOW.timestamp()
        window = Window(key.split(":")[4])
        at = old if (":compute_seconds:" in key or ":active_users:" in key) else NOW
        assert expires == int(bucket_expiry(window, at).timestamp())


NEW_YORK = ZoneInfo("America/New_York")


def test_a_customer_billed_in_a_zone_counts_its_quota_months_locally() -> None:
    """At 03:00 UTC on 1 November it is still 31 October in New York: the call counts in
    UTC's November and in the customer's local October, whose counters alerts read."""
    late_october = datetime(2026, 11, 1, 3, tzinfo=UTC)
    november = datetime(2026, 11, 2, 3, tzinfo=UTC)
    ops = build(
        CUSTOMER,
        [event("api_call", at=late_october, endpoint="/a"), event("api_call", at=november, i=1)],
        meters(SEATS),
        NOW,
        tz=NEW_YORK,
    )
    utc_month = counters("api_calls", Window.MONTH, late_october)
    local = {
        bucket: redis_keys.counters(CUSTOMER, "api_calls", Window.MONTH, bucket)
        for bucket in ("202610@America/New_York", "202611@America/New_York")
    }
    assert ops.sums[(utc_month, redis_keys.TOTAL)] == 2_000_000
    assert ops.sums[(local["202610@America/New_York"], redis_keys.TOTAL)] == 1_000_000
    assert ops.sums[(local["202611@America/New_York"], redis_keys.TOTAL)] == 1_000_000
    assert (local["202610@America/New_York"], redis_keys.group_field(("/a",))) not in ops.sums
    assert ops.months == {key: ("api_calls", bucket) for bucket, key in local.items()}
    assert ops.expiry[local["202611@America/New_York"]] == int(
        (datetime(2026, 12, 1, 5, tzinfo=UTC) + timedelta(days=400)).timestamp()
    )


def test_meters_no_quota_counts_keep_their_utc_months_in_a_zone() -> None:
    """A latest meter takes no quota: no local month, its UTC month still alerts."""
    ops = build(CUSTOMER, [event("seats", "4")], meters(SEATS), NOW, tz=NEW_YORK)
    key = counters("seats", Window.MONTH)
    assert ops.months == {key: ("seats", bucket_id(Window.MONTH, NOW))}
