"""Day and month buckets in a customer's time zone, composed of UTC hours.

Counters and rollups are kept in UTC.  A zone whose offset is a whole number of hours
starts every local day on a UTC hour, so a local day is the UTC hours between two local
midnights — 23 of them the day clocks spring forward, 25 the day they fall back — and a
local month the hours of its days.  Sums and counts add up over hours, maxima and minima
take the largest and smallest; an average, a latest value or a distinct count does not
compose from hours, and is served in UTC only.  A zone with a half- or quarter-hour
offset (India, Nepal, parts of Australia) is refused: its days do not start on an hour.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from schemas import zones
from schemas.catalog import Aggregation
from schemas.windows import Window

COMPOSABLE = (Aggregation.SUM, Aggregation.COUNT, Aggregation.MAX, Aggregation.MIN)


def local_buckets(window: Window, start: datetime, end: datetime, tz: ZoneInfo) -> list[datetime]:
    """Starts (aware, in ``tz``) of the local days or months overlapping [start, end),
    and the end of the last: n + 1 boundaries for n buckets."""
    current = _floor(window, start.astimezone(tz), tz)
    bounds = [current]
    while current < end:
        current = _next(window, current, tz)
        bounds.append(current)
    for bound in bounds:
        zones.whole_hours(bound, tz)
    return bounds


def hours(first: datetime, stop: datetime) -> Iterator[datetime]:
    """The UTC hour starts in [first, stop) (both on an hour)."""
    current = first.astimezone(UTC)
    while current < stop:
        yield current
        current += zones.HOUR


def fold(aggregation: Aggregation, values: list[int]) -> int:
    """Hours' values (micro-units) as one bucket's."""
    if aggregation is Aggregation.MAX:
        return max(values)
    if aggregation is Aggregation.MIN:
        return min(values)
    return sum(values)


def _floor(window: Window, moment: datetime, tz: ZoneInfo) -> datetime:
    day = 1 if window is Window.MONTH else moment.day
    return datetime(moment.year, moment.month, day, tzinfo=tz)


def _next(window: Window, start: datetime, tz: ZoneInfo) -> datetime:
    """The next local midnight (or first of the month), built from the calendar date so
    that the offset is the one in force then: a day is not always 24 hours."""
    if window is Window.MONTH:
        year, month = divmod(start.month, 12)
        return datetime(start.year + year, month + 1, 1, tzinfo=tz)
    following = (start.replace(tzinfo=None) + timedelta(days=1)).date()
    return datetime(following.year, following.month, following.day, tzinfo=tz)
