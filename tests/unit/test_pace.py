"""The upcoming invoice's forecast: usage so far plus the recent pace times the time left."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from schemas.catalog import Aggregation
from services.billing.invoicing import pace
from services.billing.invoicing.compose import Stretch, ceil_day
from services.billing.invoicing.periods import Period

CALLS = {"calls": Aggregation.COUNT}
NOVEMBER = Period(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
DECEMBER = Period(datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def calls_at_end(
    period: Period, first_day: date, started: str, as_of: str, so_far: int, recent: int
) -> Decimal:
    stretches = [Stretch("pro", first_day, ceil_day(at(as_of)))]
    window = pace.window(pace.since(stretches, at(started)), at(as_of))
    found = pace.forecast(
        {(0, "calls"): Decimal(so_far)},
        {"calls": Decimal(recent)},
        stretches,
        CALLS,
        window,
        period,
    )
    return found[0, "calls"]


def test_61_calls_in_the_first_minute_forecast_a_day_of_them_per_day_left() -> None:
    # Extrapolated from the minute that passed this was 61 x 44,640 = 2,723,040 calls.
    forecast = calls_at_end(
        DECEMBER, date(2026, 12, 1), "2026-12-01T00:00", "2026-12-01T00:01", 61, 61
    )
    assert round(forecast, 2) == Decimal("1951.96")  # 61 + 61 x 30.9993 days left


def test_a_steady_month_forecasts_its_own_pace() -> None:
    # 1,000 calls a day since Nov 1; at noon on the 15th: 14,500 so far, 6,500 in the
    # window (Nov 9 00:00 to now, 6.5 days), 15.5 days left.
    forecast = calls_at_end(
        NOVEMBER, date(2026, 11, 1), "2026-10-01T00:00", "2026-11-15T12:00", 14_500, 6_500
    )
    assert forecast == Decimal(30_000)


def test_a_spike_on_the_last_day_adds_only_its_share_of_the_time_left() -> None:
    # 1,000 a day, then 20,000 more by noon on Nov 30: 49,500 so far, 26,500 in the last
    # 6.5 days, 0.5 day left -> + 26,500 / 13.
    forecast = calls_at_end(
        NOVEMBER, date(2026, 11, 1), "2026-10-01T00:00", "2026-11-30T12:00", 49_500, 26_500
    )
    assert round(forecast, 2) == Decimal("51538.46")


def test_the_window_is_at_most_seven_days_and_starts_no_earlier_than_the_stretch() -> None:
    assert pace.window(at("2026-10-01"), at("2026-11-15T12:00")) == pace.Window(
        date(2026, 11, 9), at("2026-11-09"), at("2026-11-15T12:00")
    )
    late = pace.window(at("2026-11-14T18:00"), at("2026-11-15T12:00"))
    assert (late.first_day, late.start) == (date(2026, 11, 14), at("2026-11-14T18:00"))
    assert late.rated_seconds == Decimal(86_400)  # 18 h observed, rated as 24 h


def test_non_additive_meters_and_earlier_stretches_stay() -> None:
    stretches = [
        Stretch("starter", date(2026, 11, 1), date(2026, 11, 10)),
        Stretch("pro", date(2026, 11, 10), date(2026, 11, 16)),
    ]
    usage = {(0, "calls"): Decimal(900), (1, "calls"): Decimal(60), (1, "seats"): Decimal(4)}
    window = pace.window(pace.since(stretches, at("2026-10-01")), at("2026-11-15T00:00"))
    found = pace.forecast(
        usage,
        {"calls": Decimal(50), "seats": Decimal(4)},
        stretches,
        CALLS | {"seats": Aggregation.MAX},
        window,
        NOVEMBER,
    )
    # 50 calls over Nov 10..15 (5 days) = 10 a day, 16 days left.
    assert found == {(0, "calls"): Decimal(900), (1, "calls"): Decimal(220), (1, "seats"): 4}
