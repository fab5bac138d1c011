"""How the upcoming invoice forecasts usage to the period's end: the recent pace.

Extrapolating from whatever time has passed is wild early in a period: 61 calls in the
first minute after a plan change, scaled by the 44,640 minutes of a month, forecast 2.7
million calls.  The forecast instead adds, to the usage so far, the *recent rate* times
the time left:

- the window is the last ``min(7 days, elapsed)`` of the current stretch (days of the
  billing time zone: this day and the six before it, not before the stretch or the
  subscription started); usage before the window counts as observed, never scaled;
- an observed window shorter than 24 h is treated as 24 h, so an early burst is taken
  as one day's usage, not multiplied by the minutes in a month;
- only additive meters (count, sum) grow; maxima, latest values and distinct counts
  stay where they are.

So ``forecast = usage so far + window usage / max(window length, 24 h) x time left``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, localcontext
from zoneinfo import ZoneInfo

from schemas.catalog import ADDITIVE, Aggregation
from services.billing.invoicing.compose import Stretch, Usage, midnight
from services.billing.invoicing.periods import UTC_ZONE, Period
from services.billing.rating.money import EXACT

WINDOW_DAYS = 7
SHORTEST = timedelta(hours=24)
METHOD = (
    "recent pace: usage so far + (usage over the last min(7 days, elapsed), a window"
    " shorter than 24 h counted as 24 h) / window x time left in the period;"
    " max, latest and unique-count meters stay where they are"
)
"""The method as the API's ``forecast.method`` states it."""


@dataclass(frozen=True, slots=True)
class Window:
    """The recent stretch of time whose usage sets the pace."""

    first_day: date  # the first day (of ``tz``) whose usage counts
    start: datetime  # when observation starts (the later of that day and ``since``)
    as_of: datetime
    tz: ZoneInfo = UTC_ZONE

    @property
    def first(self) -> datetime:
        """The start of the first day whose usage counts."""
        return midnight(self.first_day, self.tz)

    @property
    def rated_seconds(self) -> Decimal:
        """The window's length as the rate divides by: never less than 24 h."""
        return Decimal(max(self.as_of - self.start, SHORTEST).total_seconds())


def window(since: datetime, as_of: datetime, tz: ZoneInfo = UTC_ZONE) -> Window:
    """The pace window at ``as_of`` for a stretch observed since ``since``."""
    today = as_of.astimezone(tz).date()
    first = max(since.astimezone(tz).date(), today - timedelta(days=WINDOW_DAYS - 1))
    return Window(first, max(since, midnight(first, tz)), as_of, tz)


def since(stretches: Sequence[Stretch], started: datetime) -> datetime:
    """When the current (last) stretch began to be observed: its first day, or the
    subscription's start if later."""
    return max(started, stretches[-1].start)


def forecast(
    usage: Usage,
    recent: Mapping[str, Decimal],
    stretches: Sequence[Stretch],
    aggregations: Mapping[str, Aggregation],
    pace: Window,
    period: Period,
) -> dict[tuple[int, str], Decimal]:
    """Each (stretch, meter)'s usage at the period's end: the last stretch's additive
    meters grow by their ``recent`` (window) usage's rate over the time left."""
    if not stretches:
        return dict(usage)
    last = len(stretches) - 1
    left = Decimal(max((period.end - pace.as_of).total_seconds(), 0))
    with localcontext(EXACT):
        share = left / pace.rated_seconds
        return {
            (index, meter): quantity + recent.get(meter, Decimal(0)) * share
            if index == last and aggregations.get(meter) in ADDITIVE
            else quantity
            for (index, meter), quantity in usage.items()
        }
