"""Time zones as Tally takes them: IANA names whose offset is a whole number of hours.

Counters and rollups are kept in UTC hours.  A zone whose offset is always a whole number
of hours starts each of its days on a UTC hour, so its days, months and billing periods
are made of whole UTC hours, DST changes included (a local day of 23 or 25 hours).  Zones
with half- or quarter-hour offsets (India, Nepal, parts of Australia) are refused.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HOUR = timedelta(hours=1)
UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Zulu", "Zulu", "Z"})


class ZoneError(ValueError):
    """A time zone Tally cannot use (its text says why)."""


def zone(name: str) -> ZoneInfo | None:
    """The IANA zone ``name``; None for UTC itself."""
    if name in UTC_NAMES:
        return None
    if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
        raise ZoneError(f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ZoneError(
            f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin"
        ) from None


def zone_info(name: str) -> ZoneInfo:
    """The zone ``name`` (UTC as ``ZoneInfo("UTC")``), as stored: already checked."""
    return zone(name) or ZoneInfo("UTC")


def whole_hours(moment: datetime, tz: ZoneInfo) -> None:
    """Refuse ``tz`` if its offset at ``moment`` is not a whole number of hours."""
    offset = moment.astimezone(tz).utcoffset() or timedelta()
    if offset % HOUR:
        minutes = int(offset.total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        hh, mm = divmod(abs(minutes), 60)
        raise ZoneError(
            f"{tz.key} is UTC{sign}{hh:02d}:{mm:02d} on {moment.astimezone(tz):%Y-%m-%d}:"
            " Tally takes zones whose offset is a whole number of hours"
        )


def billing_zone(name: str, now: datetime | None = None) -> str:
    """``name`` checked as a customer's billing time zone: whole hours this year, in
    winter and in summer.  Returns the name as given."""
    tz = zone(name)
    if tz is not None:
        year = (now or datetime.now(UTC)).year
        for month in (1, 7):
            whole_hours(datetime(year, month, 1, tzinfo=UTC), tz)
    return name
