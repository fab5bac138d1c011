"""How far behind a consumer group is, in seconds, from offsets alone."""

from __future__ import annotations

import pytest

from services.ingest.backpressure import Backpressure, PartitionHistory


def test_the_committed_offset_is_placed_in_the_history_by_interpolation() -> None:
    history = PartitionHistory()
    history.note(100.0, 0)
    history.note(101.0, 100)
    history.note(102.0, 300)
    # offset 200 was written half-way between the 101 s and 102 s samples
    assert history.seconds_behind(103.0, 200) == pytest.approx(1.5)
    assert history.seconds_behind(103.0, 300) == 0.0


def test_a_group_that_stops_falls_behind_one_second_per_second() -> None:
    history = PartitionHistory()
    for second in range(10):
        history.note(float(second), 10 * (second + 1))
    assert history.seconds_behind(10.0, 15) == pytest.approx(9.5)
    assert history.seconds_behind(20.0, 15) == pytest.approx(19.5)


def test_refusing_starts_over_the_bound_and_stops_under_half_of_it() -> None:
    guard = Backpressure("unused:9092", "g", max_lag_seconds=10.0)
    guard.observe(0.0, {0: 100}, {0: 0})
    assert not guard.overloaded
    assert guard.observe(11.0, {0: 200}, {0: 0}) == pytest.approx(11.0)
    assert guard.overloaded
    guard.observe(12.0, {0: 300}, {0: 150})  # 150: written at 5.5 s, 6.5 s ago
    assert guard.overloaded  # under the bound but over half of it
    guard.observe(13.0, {0: 300}, {0: 290})
    assert not guard.overloaded


def test_a_group_that_never_committed_is_not_refused_for() -> None:
    guard = Backpressure("unused:9092", "g", max_lag_seconds=1.0)
    guard.observe(0.0, {0: 100}, {})
    assert guard.observe(60.0, {0: 500}, {}) == 0.0 and not guard.overloaded
