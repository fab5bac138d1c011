"""Billing periods, and how a period splits when the plan or status changes inside it."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from schemas.catalog import Aggregation
from schemas.plans import Cycle, Interval, Plan, Price
from services.billing.invoicing import compose as invoicing
from services.billing.invoicing import pace
from services.billing.invoicing.compose import Span, State, Stretch
from services.billing.invoicing.periods import Period, period_containing, period_in_month


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_the_31st_anchors_to_the_last_day_of_shorter_months() -> None:
    anchor = date(2026, 1, 31)
    starts = [
        period_in_month(date(2026, m, 1), anchor, Cycle.ANNIVERSARY, Interval.MONTH)
        for m in (1, 2, 3, 4)
    ]
    assert [p.start.date() for p in starts if p] == [
        date(2026, 1, 31),
        date(2026, 2, 28),
        date(2026, 3, 31),
        date(2026, 4, 30),
    ]
    assert starts[1] and starts[1].end == at("2026-03-31")
    leap = period_in_month(date(2028, 2, 1), anchor, Cycle.ANNIVERSARY, Interval.MONTH)
    assert leap and leap.start == at("2028-02-29")


def test_yearly_periods() -> None:
    leap_day = date(2028, 2, 29)
    period = period_in_month(date(2029, 2, 1), leap_day, Cycle.ANNIVERSARY, Interval.YEAR)
    assert period == Period(at("2029-02-28"), at("2030-02-28"))
    assert period_in_month(date(2029, 3, 1), leap_day, Cycle.ANNIVERSARY, Interval.YEAR) is None
    calendar = period_containing(
        at("2026-07-04T12:00"), date(2026, 3, 9), Cycle.CALENDAR, Interval.YEAR
    )
    assert calendar == Period(at("2026-01-01"), at("2027-01-01"))


def test_a_period_is_named_by_the_month_it_starts_in() -> None:
    period = period_containing(
        at("2026-12-03"), date(2026, 5, 15), Cycle.ANNIVERSARY, Interval.MONTH
    )
    assert period == Period(at("2026-11-15"), at("2026-12-15"))
    assert period.label == "2026-11"


@given(
    instant=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
    ),
    anchor=st.dates(min_value=date(2018, 1, 1), max_value=date(2034, 12, 31)),
    cycle=st.sampled_from(list(Cycle)),
    interval=st.sampled_from(list(Interval)),
)
def test_periods_tile_time(instant: datetime, anchor: date, cycle: Cycle, interval: Interval):
    period = period_containing(instant, anchor, cycle, interval)
    assert period.start <= instant < period.end
    assert period_in_month(period.start.date(), anchor, cycle, interval) == period
    after = period_containing(period.end, anchor, cycle, interval)
    assert after.start == period.end
    before = period_containing(period.start - timedelta(microseconds=1), anchor, cycle, interval)
    assert before.end == period.start


NOVEMBER = Period(at("2026-11-01"), at("2026-12-01"))


def test_an_upgrade_mid_period_prorates_the_fee_and_splits_usage_by_day() -> None:
    states = [
        State(at("2026-10-01"), "starter", "active"),
        State(at("2026-11-16T09:00"), "pro", "active"),
    ]
    fees = invoicing.fee_stretches(NOVEMBER, states, NOVEMBER.end)
    assert fees == [
        Span("starter", at("2026-11-01"), at("2026-11-16T09:00")),
        Span("pro", at("2026-11-16T09:00"), at("2026-12-01")),
    ]
    # The 16th ends on pro, so its usage is rated under pro.
    assert invoicing.usage_stretches(NOVEMBER, states, NOVEMBER.end) == [
        Stretch("starter", date(2026, 11, 1), date(2026, 11, 16)),
        Stretch("pro", date(2026, 11, 16), date(2026, 12, 1)),
    ]


def test_trial_days_are_not_charged_and_status_changes_do_not_split_usage() -> None:
    states = [
        State(at("2026-11-03T10:00"), "pro", "trial"),
        State(at("2026-11-17T10:00"), "pro", "active"),
        State(at("2026-11-20"), "pro", "past_due"),
        State(at("2026-11-22"), "pro", "active"),
        State(at("2026-11-25T12:00"), "pro", "cancelled"),
    ]
    fees = invoicing.fee_stretches(NOVEMBER, states, NOVEMBER.end)
    assert fees == [Span("pro", at("2026-11-17T10:00"), at("2026-11-25T12:00"))]
    stretches = invoicing.usage_stretches(NOVEMBER, states, NOVEMBER.end)
    assert stretches == [Stretch("pro", date(2026, 11, 17), date(2026, 12, 1))]


def test_fee_and_usage_lines_of_a_split_period() -> None:
    starter = Plan(
        id="starter",
        name="Starter",
        price=Decimal(30),
        prices={"calls": Price(unit_price=Decimal("0.01"), included=Decimal(100))},
    )
    pro = Plan(
        id="pro",
        name="Pro",
        price=Decimal(90),
        prices={"calls": Price(unit_price=Decimal("0.001"), included=Decimal(1000))},
    )
    fees = [
        Span("starter", at("2026-11-01"), at("2026-11-11")),
        Span("pro", at("2026-11-11"), at("2026-12-01")),
    ]
    stretches = [
        Stretch("starter", date(2026, 11, 1), date(2026, 11, 11)),
        Stretch("pro", date(2026, 11, 11), date(2026, 12, 1)),
    ]
    usage = {(0, "calls"): Decimal(350), (1, "calls"): Decimal(4000)}
    lines = invoicing.lines(
        fees, stretches, usage, {"starter": starter, "pro": pro}, lambda plan, instant: NOVEMBER
    )
    assert [line.amount for line in lines] == [
        Decimal("10.00"),
        Decimal("60.00"),
        Decimal("2.50"),
        Decimal("3.00"),
    ]


def test_forecast_grows_additive_meters_at_their_recent_pace() -> None:
    stretches = [Stretch("pro", date(2026, 11, 1), date(2026, 11, 11))]
    usage = {(0, "calls"): Decimal(100), (0, "storage"): Decimal(7)}
    window = pace.window(pace.since(stretches, at("2026-10-01")), at("2026-11-11"))
    forecast = pace.forecast(
        usage,
        {"calls": Decimal(60)},  # 10 a day over the window's six days
        stretches,
        {"calls": Aggregation.COUNT, "storage": Aggregation.MAX},
        window,
        NOVEMBER,
    )
    assert forecast == {(0, "calls"): Decimal(300), (0, "storage"): Decimal(7)}


NEW_YORK = ZoneInfo("America/New_York")


def test_periods_start_at_local_midnight_and_daylight_saving_shortens_march() -> None:
    calendar = (date(2026, 1, 10), Cycle.CALENDAR, Interval.MONTH, NEW_YORK)
    march = period_containing(at("2026-03-15"), *calendar)
    assert (march.start, march.end) == (at("2026-03-01T05:00"), at("2026-04-01T04:00"))
    assert march.seconds == 743 * 3600 and march.label == "2026-03"
    # 1 March 03:00 UTC is still February in New York
    february = period_containing(at("2026-03-01T03:00"), *calendar)
    assert february.end == march.start and february.label == "2026-02"
    october = period_in_month(
        date(2026, 10, 1), date(2026, 1, 10), Cycle.ANNIVERSARY, Interval.MONTH, NEW_YORK
    )
    assert october is not None  # clocks fall back on 1 November: an hour longer
    assert (october.start, october.end) == (at("2026-10-10T04:00"), at("2026-11-10T05:00"))
    assert october.seconds == (31 * 24 + 1) * 3600
