from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from schemas.redis_keys import DIGEST_BYTES
from schemas.redis_keys import event_digest as digest
from services.aggregator.dedupe import DedupeWindow

T0 = datetime(2026, 11, 3, 10, 15, 30, tzinfo=UTC)

# Windows the settings can produce (whole hours) and a few shorter ones that divide evenly.
WINDOWS = st.sampled_from(
    [timedelta(hours=h) for h in (1, 2, 24, 48)] + [timedelta(minutes=6), timedelta(seconds=60)]
)
MOMENTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


def test_buckets_of_a_day() -> None:
    window = DedupeWindow(timedelta(hours=24))
    assert window.bucket_seconds == 4 * 3600
    current = window.current(T0)
    assert window.live(T0) == [current - i for i in range(7)]


def covered(window: DedupeWindow, stored_at: datetime, now: datetime) -> bool:
    return window.current(stored_at) in window.live(now)


@given(WINDOWS, MOMENTS, st.floats(min_value=0, max_value=1))
def test_live_covers_the_whole_window(window: timedelta, t0: datetime, fraction: float) -> None:
    dedupe = DedupeWindow(window)
    assert covered(dedupe, t0, t0 + window * fraction)


@given(WINDOWS, MOMENTS, st.floats(min_value=0, max_value=1))
def test_bucket_expires_after_the_window(window: timedelta, t0: datetime, fraction: float) -> None:
    dedupe = DedupeWindow(window)
    bucket = dedupe.current(t0)
    assert dedupe.expires_at(bucket) >= (t0 + window).timestamp()
    # and a bucket is dropped only when no live() can ask for it any more
    later = datetime.fromtimestamp(dedupe.expires_at(bucket), UTC)
    assert bucket not in dedupe.live(later)
    assert bucket in dedupe.live(later - timedelta(seconds=1))


def test_live_forgets_after_the_window() -> None:
    dedupe = DedupeWindow(timedelta(hours=24))
    far = T0 + timedelta(hours=24 + 4 + 1)
    assert not covered(dedupe, T0, far)


def test_live_covers_window_not_divisible_by_parts() -> None:
    dedupe = DedupeWindow(timedelta(seconds=100))  # 6 parts of 16 s cover 96 s
    t0 = datetime.fromtimestamp(1_800_000_015, UTC)  # the last second of its bucket
    assert covered(dedupe, t0, t0 + timedelta(seconds=99))


def test_digest_is_8_bytes_and_stable() -> None:
    one = digest("gateway-eu", "evt-1")
    assert len(one) == DIGEST_BYTES == 8
    assert one == digest("gateway-eu", "evt-1")
    assert one.hex() == "fadf44bf17deb26a"  # must not change across releases: keys persist


def test_digest_distinguishes_the_split_point() -> None:
    assert digest("a", "bc") != digest("ab", "c")
    assert digest("gateway-eu", "evt-1") != digest("gateway-eu", "evt-2")
    assert digest("gateway-eu", "evt-1") != digest("gateway-us", "evt-1")


def test_key_names_the_customer_and_bucket() -> None:
    assert DedupeWindow(timedelta(hours=24)).key("cust_42", 123) == "tally:{cust_42}:seen:123"
