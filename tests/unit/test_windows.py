from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.windows import Window, bucket_expiry, bucket_id, bucket_start, buckets, next_bucket

CET = timezone(timedelta(hours=1))


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


MOMENT = datetime(2026, 11, 3, 10, 15, 30, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "start", "after", "ident"),
    [
        (Window.MINUTE, utc(2026, 11, 3, 10, 15), utc(2026, 11, 3, 10, 16), "202611031015"),
        (Window.HOUR, utc(2026, 11, 3, 10), utc(2026, 11, 3, 11), "2026110310"),
        (Window.DAY, utc(2026, 11, 3), utc(2026, 11, 4), "20261103"),
        (Window.MONTH, utc(2026, 11, 1), utc(2026, 12, 1), "202611"),
    ],
)
def test_bucket(window: Window, start: datetime, after: datetime, ident: str) -> None:
    assert bucket_start(window, MOMENT) == start
    assert next_bucket(window, start) == after
    assert bucket_id(window, MOMENT) == ident
    assert bucket_start(window, start) == start  # a bucket start is its own bucket


@pytest.mark.parametrize(
    ("moment", "month", "next_month", "day", "next_day"),
    [
        (utc(2026, 1, 31, 23, 59), "202601", utc(2026, 2, 1), "20260131", utc(2026, 2, 1)),
        (utc(2026, 12, 31, 23, 59), "202612", utc(2027, 1, 1), "20261231", utc(2027, 1, 1)),
        (utc(2028, 2, 29, 12), "202802", utc(2028, 3, 1), "20280229", utc(2028, 3, 1)),
        (utc(2028, 2, 28, 12), "202802", utc(2028, 3, 1), "20280228", utc(2028, 2, 29)),
        (utc(2027, 2, 28, 12), "202702", utc(2027, 3, 1), "20270228", utc(2027, 3, 1)),
    ],
)
def test_month_and_day_boundaries(
    moment: datetime, month: str, next_month: datetime, day: str, next_day: datetime
) -> None:
    assert bucket_id(Window.MONTH, moment) == month
    assert next_bucket(Window.MONTH, bucket_start(Window.MONTH, moment)) == next_month
    assert bucket_id(Window.DAY, moment) == day
    assert next_bucket(Window.DAY, bucket_start(Window.DAY, moment)) == next_day


def test_month_sequence_crosses_year() -> None:
    starts = list(buckets(Window.MONTH, utc(2026, 11, 15), utc(2027, 2, 1)))
    assert starts == [utc(2026, 11, 1), utc(2026, 12, 1), utc(2027, 1, 1)]


def test_non_utc_input_is_bucketed_in_utc() -> None:
    moment = datetime(2026, 12, 1, 0, 30, tzinfo=CET)  # 2026-11-30T23:30Z
    assert bucket_id(Window.MONTH, moment) == "202611"
    assert bucket_id(Window.DAY, moment) == "20261130"
    assert bucket_id(Window.HOUR, moment) == "2026113023"
    assert bucket_id(Window.MINUTE, moment) == "202611302330"
    assert bucket_start(Window.MONTH, moment) == utc(2026, 11, 1)
    assert bucket_start(Window.DAY, moment).tzinfo is UTC


def test_bucket_expiry_counts_from_bucket_end() -> None:
    assert bucket_expiry(Window.MINUTE, MOMENT) == utc(2026, 11, 3, 13, 16)
    assert bucket_expiry(Window.MONTH, MOMENT) == utc(2026, 12, 1) + timedelta(days=400)


def test_buckets_half_open() -> None:
    start, end = utc(2026, 11, 3, 10, 0, 30), utc(2026, 11, 3, 10, 3)
    assert list(buckets(Window.MINUTE, start, end)) == [
        utc(2026, 11, 3, 10, 0),  # start mid-bucket: its bucket overlaps
        utc(2026, 11, 3, 10, 1),
        utc(2026, 11, 3, 10, 2),  # end on a boundary: the bucket starting at end does not
    ]
    assert list(buckets(Window.MINUTE, start, end + timedelta(microseconds=1)))[-1] == end


def test_buckets_within_one_bucket() -> None:
    start = utc(2026, 11, 3, 10, 5)
    assert list(buckets(Window.HOUR, start, start + timedelta(minutes=10))) == [
        utc(2026, 11, 3, 10)
    ]
    assert list(buckets(Window.DAY, utc(2026, 11, 3), utc(2026, 11, 4))) == [utc(2026, 11, 3)]


def test_buckets_with_non_utc_bounds() -> None:
    start = datetime(2026, 12, 1, 0, 30, tzinfo=CET)  # 2026-11-30T23:30Z
    end = datetime(2026, 12, 2, 0, 30, tzinfo=CET)  # 2026-12-01T23:30Z
    assert list(buckets(Window.DAY, start, end)) == [utc(2026, 11, 30), utc(2026, 12, 1)]


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
aware = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets
)


@given(st.sampled_from(Window), aware)
def test_moment_lies_in_its_bucket(window: Window, moment: datetime) -> None:
    start = bucket_start(window, moment)
    assert start <= moment < next_bucket(window, start)
    assert start.tzinfo is UTC


SPANS = {
    Window.MINUTE: timedelta(hours=3),
    Window.HOUR: timedelta(days=3),
    Window.DAY: timedelta(days=90),
    Window.MONTH: timedelta(days=1200),
}


@given(st.sampled_from(Window), aware, st.data())
def test_buckets_cover_range_exactly(window: Window, start: datetime, data: st.DataObject) -> None:
    span = data.draw(st.timedeltas(min_value=timedelta(microseconds=1), max_value=SPANS[window]))
    end = start + span
    starts = list(buckets(window, start, end))
    assert starts[0] <= start < next_bucket(window, starts[0])
    assert starts[-1] < end <= next_bucket(window, starts[-1])
    for before, after in pairwise(starts):
        assert next_bucket(window, before) == after
