"""Time zones as Tally takes them: IANA names whose offset is a whole number of hours.

Counters and rollups are kept in UTC hours.  A zone whose offset is always a whole number
of hours starts each of its days on a UTC hour, so its days, months and billing periods
are made of whole UTC hours, DST changes included (a local day of 23 or 25 hours).  Zones
with half- or quarter-hour offsets (India, Nepal, parts of Australia) are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

HOUR = timedelta(hours=1)
UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Zulu", "Zulu", "Z"})


class ZoneError(ValueError):
    """A time zone Tally cannot use (its text says why)."""


NOT_ZONES = frozenset({"localtime", "Factory"})
"""Files of the zone database that name no place: ``localtime`` is whatever zone the
server is set to (a customer's days would move with the machine), ``Factory`` a
placeholder."""


@functools.cache
def _names() -> frozenset[str]:
    """The IANA names this machine's zone data knows (read once: some 30 ms)."""
    return frozenset(available_timezones()) - NOT_ZONES


def asked_zone(name: str) -> ZoneInfo | None:
    """The IANA zone a client names (a query's ``tz``, a customer's billing zone); None
    for UTC itself.  Only the database's names of places: ``zone`` reads what is
    stored, checked when it was taken."""
    if name not in UTC_NAMES and name not in _names():
        raise ZoneError(f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin")
    return zone(name)


def zone(name: str) -> ZoneInfo | None:
    """The zone ``name`` as stored or projected (a customer's billing zone, a quota
    month's bucket id); None for UTC itself.  Names taken before ``asked_zone`` was as
    strict as it is (``posix/Europe/Berlin``) are still read, so stored ones keep
    working."""
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
    tz = asked_zone(name)
    if tz is not None:
        year = (now or datetime.now(UTC)).year
        for month in (1, 7):
            whole_hours(datetime(year, month, 1, tzinfo=UTC), tz)
    return name


QUOTA_ZONE_MARK = "@"
"""Separates a quota month's local ``yyyymm`` from its zone in a counter's bucket id:
``202612@America/New_York``.  UTC customers keep the UTC month bucket (``202612``)."""


@dataclass(frozen=True, slots=True)
class QuotaMonth:
    """The quota period holding an instant: the calendar month in the customer's billing
    zone, as the bucket id of its month counters and its UTC bounds."""

    bucket: str
    start: datetime
    end: datetime


def quota_month(moment: datetime, tz: ZoneInfo | None) -> QuotaMonth:
    """The quota month holding ``moment`` for a customer billed in ``tz`` (None: UTC)."""
    hour = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return _quota_month(hour, tz)


@functools.lru_cache(maxsize=4096)
def _quota_month(hour: datetime, tz: ZoneInfo | None) -> QuotaMonth:
    local = hour.astimezone(tz or UTC)
    start = datetime(local.year, local.month, 1, tzinfo=tz or UTC)
    following = datetime(local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=tz or UTC)
    label = f"{local.year:04d}{local.month:02d}"
    bucket = label if tz is None else f"{label}{QUOTA_ZONE_MARK}{tz.key}"
    return QuotaMonth(bucket, start.astimezone(UTC), following.astimezone(UTC))


def quota_bounds(bucket: str) -> tuple[datetime, datetime]:
    """The UTC bounds of the quota month a bucket id names (``quota_month``'s)."""
    label, _, name = bucket.partition(QUOTA_ZONE_MARK)
    tz = zone(name) if name else None
    first = datetime(int(label[:4]), int(label[4:6]), 1, 12, tzinfo=tz or UTC)
    found = quota_month(first, tz)
    return found.start, found.end
