"""A quota's month in the customer's billing zone: local midnight to local midnight."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from schemas.zones import ZoneError, asked_zone, quota_bounds, quota_month, zone

NY, BERLIN = zone("America/New_York"), zone("Europe/Berlin")


JAN_END = datetime(2027, 1, 31, 23, tzinfo=UTC)
NOV, DEC, MAR = (f"2026{m}@America/New_York" for m in ("11", "12", "03"))


def utc(*parts: int) -> datetime:
    year, month, day, hour = parts
    return datetime(year, month, day, hour, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "tz", "bucket", "start", "end"),
    [
        # UTC customers keep the UTC month and its bucket id
        (utc(2026, 12, 31, 23), None, "202612", utc(2026, 12, 1, 0), utc(2027, 1, 1, 0)),
        # 03:00 UTC on 1 December is still November in New York (UTC-5)
        (utc(2026, 12, 1, 3), NY, NOV, utc(2026, 11, 1, 4), utc(2026, 12, 1, 5)),
        (utc(2026, 12, 1, 5), NY, DEC, utc(2026, 12, 1, 5), utc(2027, 1, 1, 5)),
        # March springs forward: it starts at UTC-5 and ends at UTC-4 (743 hours)
        (utc(2026, 3, 15, 12), NY, MAR, utc(2026, 3, 1, 5), utc(2026, 4, 1, 4)),
        # 23:00 UTC on 31 December is already January in Berlin (UTC+1)
        (utc(2026, 12, 31, 23), BERLIN, "202701@Europe/Berlin", utc(2026, 12, 31, 23), JAN_END),
    ],
)  # fmt: skip
def test_the_quota_month_holding_an_instant(
    moment: datetime, tz: ZoneInfo | None, bucket: str, start: datetime, end: datetime
) -> None:
    found = quota_month(moment.replace(minute=17), tz)
    assert (found.bucket, found.start, found.end) == (bucket, start, end)
    assert quota_bounds(bucket) == (start, end)


@pytest.mark.parametrize(
    "name", ["localtime", "Factory", "posixrules", "right/UTC", "posix/Europe/Berlin", "../UTC"]
)
def test_zone_files_that_name_no_place_are_refused_when_asked_for(name: str) -> None:
    """``localtime`` is whatever the server is set to: a customer's days would move with
    the machine Tally runs on."""
    with pytest.raises(ZoneError, match="unknown time zone"):
        asked_zone(name)


def test_a_zone_stored_before_the_check_is_still_read() -> None:
    """A billing zone taken when only loading it was checked must not stop billing."""
    assert zone("posix/Europe/Berlin") == ZoneInfo("posix/Europe/Berlin")


@pytest.mark.parametrize("name", ["Europe/Berlin", "America/New_York", "Etc/GMT+5", "US/Eastern"])
def test_iana_names_are_taken(name: str) -> None:
    assert asked_zone(name) == zone(name) == ZoneInfo(name)
