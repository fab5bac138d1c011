"""Billing periods: where each one starts and ends, at midnight in the customer's
billing time zone (UTC unless it has one).

A calendar cycle starts periods on the 1st of the month (or on 1 January, yearly).  An
anniversary cycle starts them on the day of the month the subscription's anchor fell
on — its trial end, or its start — and when that day does not exist in a month (the
31st in April, the 29th of February) on that month's last day.  A period is named by
the month it starts in (``2026-11``), locally.  In a zone with daylight saving time a
period is an hour shorter or longer than its days: March in New York has 743 hours.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

from schemas.plans import Cycle, Interval

UTC_ZONE = ZoneInfo("UTC")


@dataclass(frozen=True, slots=True)
class Period:
    """[start, end) in UTC (aware datetimes of one zone subtract as wall clocks: a
    period of New York's would lose its daylight-saving hour); ``tz`` its local time."""

    start: datetime
    end: datetime
    tz: ZoneInfo = UTC_ZONE

    @property
    def label(self) -> str:
        return f"{self.start.astimezone(self.tz):%Y-%m}"

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())


def period_in_month(
    month: date, anchor: date, cycle: Cycle, interval: Interval, tz: ZoneInfo = UTC_ZONE
) -> Period | None:
    """The period that starts in ``month`` (any day of it; local), if one does."""
    months = _months(interval)
    first = _first_month(anchor, cycle, interval)
    offset = _month_index(month) - _month_index(first)
    if offset % months:
        return None
    return _nth(first, anchor.day if cycle is Cycle.ANNIVERSARY else 1, offset, months, tz)


def period_containing(
    instant: datetime, anchor: date, cycle: Cycle, interval: Interval, tz: ZoneInfo = UTC_ZONE
) -> Period:
    """The period ``instant`` falls in (periods extend backwards before the anchor too)."""
    months = _months(interval)
    first = _first_month(anchor, cycle, interval)
    day = anchor.day if cycle is Cycle.ANNIVERSARY else 1
    local = instant.astimezone(tz).date()
    offset = (_month_index(local) - _month_index(first)) // months * months
    period = _nth(first, day, offset, months, tz)
    if instant < period.start:
        period = _nth(first, day, offset - months, months, tz)
    return period


def parse_month(text: str) -> date:
    """``YYYY-MM`` as the first day of that month; ValueError otherwise."""
    try:
        return datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise ValueError(f"expected a month as YYYY-MM, got {text!r}") from None


def months_before(day: date, months: int) -> date:
    """The first day of the month ``months`` before ``day``'s."""
    year, month = divmod(_month_index(day) - months, 12)
    return date(year, month + 1, 1)


def _nth(first: date, day: int, offset: int, months: int, tz: ZoneInfo) -> Period:
    return Period(_start(first, day, offset, tz), _start(first, day, offset + months, tz), tz)


def _start(first: date, day: int, offset: int, tz: ZoneInfo) -> datetime:
    """Local midnight (its offset the one in force that day), in UTC."""
    index = _month_index(first) + offset
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return datetime.combine(date(year, month + 1, min(day, last)), time(), tz).astimezone(UTC)


def _first_month(anchor: date, cycle: Cycle, interval: Interval) -> date:
    """The month the anchor's period starts in: a calendar year starts in January."""
    if cycle is Cycle.CALENDAR and interval is Interval.YEAR:
        return date(anchor.year, 1, 1)
    return anchor.replace(day=1)


def _months(interval: Interval) -> int:
    return 12 if interval is Interval.YEAR else 1


def _month_index(day: date) -> int:
    return day.year * 12 + day.month - 1
