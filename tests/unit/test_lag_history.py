"""How far behind a consumer group is, in seconds, from offsets alone."""

from __future__ import annotations

import pytest

from services.ingest.backpressure import Backpressure, PartitionHistory


def test_the_first_poll_that_saw_the_committed_offset_dates_it() -> None:
    history = PartitionHistory()
    history.note(100.0, 0)
    history.note(101.0, 100)
    history.note(102.0, 300)
    # offset 0 first appeared at 101 s, however long the partition was idle before
    assert history.seconds_behind(103.0, 0) == pytest.approx(2.0)
    # offset 200 was written after the 101 s poll and was there at the 102 s one
    assert history.seconds_behind(103.0, 200) == pytest.approx(1.0)
    assert history.seconds_behind(103.0, 300) == 0.0


def test_a_group_that_stops_falls_behind_one_second_per_second() -> None:
    history = PartitionHistory()
    for second in range(10):
        history.note(float(second), 10 * (second + 1))
    assert history.seconds_behind(10.0, 15) == pytest.approx(9.0)
    assert history.seconds_behind(20.0, 15) == pytest.approx(19.0)


def test_refusing_starts_over_the_bound_and_stops_under_half_of_it() -> None:
    guard = Backpressure("unused:9092", "g", max_lag_seconds=10.0)
    guard.observe(0.0, {0: 0}, {0: 0})
    guard.observe(1.0, {0: 100}, {0: 0})
    guard.observe(4.0, {0: 200}, {0: 0})
    assert not guard.overloaded
    assert guard.observe(11.5, {0: 300}, {0: 0}) == pytest.approx(10.5)
    assert guard.overloaded
    guard.observe(12.0, {0: 300}, {0: 150})  # 150: there since 4 s, 8 s ago
    assert guard.overloaded  # under the bound but over half of it
    guard.observe(13.0, {0: 300}, {0: 250})
    assert not guard.overloaded


def test_a_group_that_never_committed_is_not_refused_for() -> None:
    guard = Backpressure("unused:9092", "g", max_lag_seconds=1.0)
    guard.observe(0.0, {0: 100}, {})
    assert guard.observe(60.0, {0: 500}, {}) == 0.0 and not guard.overloaded
