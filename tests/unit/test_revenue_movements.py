"""Committed MRR and its monthly movements: ChartMogul's definitions on Tally's
subscription histories, and the identity ending = starting + new + expansion +
reactivation - contraction - churn, exactly, over random histories."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.plans import Interval, Plan
from services.billing.invoicing.compose import State
from services.billing.revenue import movements, trials
from services.billing.revenue.movements import Movement
from services.billing.revenue.mrr import FeeBook, Mrr, at, monthly, timeline

D = Decimal
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def plan(pid: str, price: str, interval: Interval = Interval.MONTH, currency: str = "usd") -> Plan:
    return Plan(id=pid, name=pid, price=D(price), interval=interval, currency=currency)


BOOK = FeeBook(
    {
        "free": [(EPOCH, plan("free", "0"))],
        "starter": [(EPOCH, plan("starter", "49"))],
        "pro": [(EPOCH, plan("pro", "199"))],
        "yearly": [(EPOCH, plan("yearly", "2000", Interval.YEAR))],
        "euro": [(EPOCH, plan("euro", "30", currency="eur"))],
    }
)


def months(first: str, count: int) -> list[tuple[datetime, datetime]]:
    start = t(first)
    found = []
    for _ in range(count):
        end = (start + timedelta(days=32)).replace(day=1)
        found.append((start, end))
        start = end
    return found


def flows(histories: list[list[State]], first: str = "2025-01-01", count: int = 3):
    return movements.monthly([timeline(h, BOOK) for h in histories], months(first, count))


def moved(flow: movements.MonthFlow) -> dict[str, Decimal]:
    return {m.value: a for m, a in flow.moved.items() if a}


def test_a_yearly_fee_is_a_twelfth_a_month_rounded_half_up_once() -> None:
    assert monthly(plan("y", "2000", Interval.YEAR)) == Mrr("usd", D("166.67"))
    assert monthly(plan("y", "1000", Interval.YEAR)) == Mrr("usd", D("83.33"))
    assert monthly(plan("y", "12000", Interval.YEAR, "jpy")) == Mrr("jpy", D("1000"))
    assert monthly(plan("m", "49")) == Mrr("usd", D("49.00"))
    assert monthly(plan("f", "0")) is None


def test_trials_suspended_and_cancelled_are_worth_nothing_past_due_counts() -> None:
    history = [
        State(t("2025-01-01"), "pro", "trial"),
        State(t("2025-01-15"), "pro", "active"),
        State(t("2025-02-01"), "pro", "past_due"),
        State(t("2025-02-10"), "pro", "suspended"),
        State(t("2025-03-01"), "pro", "cancelled"),
    ]
    points = timeline(history, BOOK)
    assert at(points, t("2025-01-10")) is None
    assert at(points, t("2025-01-20")) == Mrr("usd", D("199.00"))
    assert at(points, t("2025-02-05")) == Mrr("usd", D("199.00"))
    assert at(points, t("2025-02-11")) is None
    assert at(points, t("2025-03-02")) is None


def test_trial_converting_is_new_in_the_month_it_converts() -> None:
    history = [State(t("2025-01-20"), "pro", "trial"), State(t("2025-02-03"), "pro", "active")]
    jan, feb, mar = flows([history])["usd"]
    assert moved(jan) == {} and jan.ending == 0
    assert moved(feb) == {"new": D("199.00")} and feb.ending == D("199.00")
    assert feb.customers[Movement.NEW] == 1
    assert mar.starting == mar.ending == D("199.00") and moved(mar) == {}


def test_upgrade_is_expansion_downgrade_contraction_cancel_churn_return_reactivation() -> None:
    history = [
        State(t("2025-01-05"), "starter", "active"),
        State(t("2025-01-20"), "pro", "active"),  # +150
        State(t("2025-02-02"), "starter", "active"),  # -150
        State(t("2025-02-20"), "starter", "cancelled"),  # -49
        State(t("2025-03-10"), "pro", "active"),  # back: +199
    ]
    jan, feb, mar = flows([history])["usd"]
    assert moved(jan) == {"new": D("49.00"), "expansion": D("150.00")}
    assert moved(feb) == {"contraction": D("150.00"), "churn": D("49.00")}
    assert (feb.starting, feb.ending) == (D("199.00"), D(0))
    assert moved(mar) == {"reactivation": D("199.00")}
    assert all(f.balances() for f in (jan, feb, mar))


def test_a_free_plan_is_no_mrr_so_paying_later_is_new() -> None:
    history = [
        State(t("2024-06-01"), "free", "active"),
        State(t("2025-02-01"), "starter", "active"),
    ]
    jan, feb, _ = flows([history])["usd"]
    assert jan.starting == 0 and moved(feb) == {"new": D("49.00")}


def test_suspension_is_churn_and_the_return_reactivation() -> None:
    history = [
        State(t("2024-12-01"), "pro", "active"),
        State(t("2025-01-10"), "pro", "past_due"),  # still counts: no movement
        State(t("2025-01-20"), "pro", "suspended"),
        State(t("2025-02-05"), "pro", "active"),
    ]
    jan, feb, _ = flows([history])["usd"]
    assert jan.starting == D("199.00") and moved(jan) == {"churn": D("199.00")}
    assert moved(feb) == {"reactivation": D("199.00")}


def test_a_new_plan_version_moves_every_subscriber() -> None:
    book = FeeBook(
        {
            "pro": [
                (EPOCH, plan("pro", "199")),
                (t("2025-02-10"), plan("pro", "249")),
                (t("2025-02-15"), plan("pro", "249")),  # a change that is not the fee
                (t("2025-03-01"), plan("pro", "99")),
            ]
        }
    )
    history = [State(t("2025-01-01"), "pro", "active")]
    points = timeline(history, book)
    assert [p.at for p in points] == [t("2025-01-01"), t("2025-02-10"), t("2025-03-01")]
    jan, feb, mar = movements.monthly([points], months("2025-01-01", 3))["usd"]
    assert moved(jan) == {"new": D("199.00")}
    assert moved(feb) == {"expansion": D("50.00")}
    assert moved(mar) == {"contraction": D("150.00")} and mar.ending == D("99.00")


def test_currencies_are_never_added_up() -> None:
    history = [
        State(t("2025-01-01"), "starter", "active"),
        State(t("2025-02-01"), "euro", "active"),
    ]
    found = flows([history])
    assert moved(found["usd"][1]) == {"churn": D("49.00")}
    assert moved(found["eur"][1]) == {"new": D("30.00")}
    assert found["eur"][2].ending == D("30.00") and found["usd"][2].ending == 0


def test_rows_at_one_instant_count_as_the_last_of_them() -> None:
    moment = t("2025-01-10")
    history = [
        State(t("2025-01-01"), "starter", "active"),
        State(moment, "pro", "active"),
        State(moment, "pro", "cancelled"),
    ]
    assert moved(flows([history])["usd"][0]) == {"new": D("49.00"), "churn": D("49.00")}


def test_trials_started_converted_and_expired() -> None:
    histories = [
        [State(t("2025-01-03"), "pro", "trial"), State(t("2025-01-17"), "pro", "active")],
        [State(t("2025-01-05"), "pro", "trial"), State(t("2025-02-19"), "free", "active")],
        [State(t("2025-01-07"), "pro", "trial"), State(t("2025-02-21"), "pro", "suspended")],
        [State(t("2025-02-01"), "pro", "trial"), State(t("2025-02-15"), "starter", "past_due")],
        [State(t("2025-03-01"), "starter", "trial")],
    ]
    jan, feb, mar = trials.monthly(histories, BOOK, months("2025-01-01", 3))
    assert (jan.started, jan.converted, jan.expired) == (3, 1, 0)
    assert jan.conversion_rate == D(1)
    assert (feb.started, feb.converted, feb.expired) == (1, 1, 2)
    assert feb.conversion_rate == D("0.3333")
    assert (mar.started, mar.conversion_rate) == (1, None)


VERSIONED = FeeBook(
    {
        "free": [(EPOCH, plan("free", "0"))],
        "starter": [(EPOCH, plan("starter", "49")), (t("2025-03-10"), plan("starter", "59"))],
        "pro": [
            (EPOCH, plan("pro", "199")),
            (t("2025-02-01"), plan("pro", "99")),
            (t("2025-05-20"), plan("pro", "0")),
            (t("2025-06-01"), plan("pro", "249", currency="eur")),
        ],
        "yearly": [(EPOCH, plan("yearly", "2000", Interval.YEAR))],
        "euro": [(EPOCH, plan("euro", "30", currency="eur"))],
    }
)
PLANS = sorted(BOOK._changed)
STATUSES = ["trial", "active", "past_due", "suspended", "cancelled"]
state_rows = st.lists(
    st.tuples(
        st.integers(0, 24 * 200),  # hours after the start
        st.sampled_from(PLANS),
        st.sampled_from(STATUSES),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(state_rows, min_size=1, max_size=8), st.integers(0, 5), st.booleans())
def test_every_month_balances_exactly(rows, skip, versioned) -> None:
    start = t("2025-01-01")
    histories = [
        [State(start + timedelta(hours=h), p, s) for h, p, s in sorted(r, key=lambda x: x[0])]
        for r in rows
    ]
    window = months("2025-01-01", 8)[skip:]
    book = VERSIONED if versioned else BOOK
    timelines = [timeline(h, book) for h in histories]
    for history, points in zip(histories, timelines, strict=True):
        for probe in _probes(history):
            assert at(points, probe) == _brute_force(history, book, probe), probe
    for currency, months_of in movements.monthly(timelines, window).items():
        for index, flow in enumerate(months_of):
            assert flow.balances(), (currency, index, flow)
            expected_start = sum(
                (_amount_at(p, window[index][0], currency) for p in timelines), D(0)
            )
            expected_end = sum((_amount_at(p, window[index][1], currency) for p in timelines), D(0))
            assert flow.starting == expected_start and flow.ending == expected_end
            if index:
                assert flow.starting == months_of[index - 1].ending
            assert all(amount >= 0 for amount in flow.moved.values())


VERSION_CHANGES = sorted({when for rows in VERSIONED._changed.values() for when in rows})


def _probes(history: list[State]) -> list[datetime]:
    """Every instant the MRR may change at, and a second before and after each."""
    second = timedelta(seconds=1)
    instants = {s.at for s in history} | set(VERSION_CHANGES)
    return sorted({i + d for i in instants for d in (-second, timedelta(0), second)})


def _brute_force(history: list[State], book: FeeBook, instant: datetime) -> Mrr | None:
    """The last row at or before ``instant``, valued with the version in effect then."""
    rows = [s for s in history if s.at <= instant]
    if not rows or rows[-1].status not in ("active", "past_due"):
        return None
    return book.at(rows[-1].plan, instant)


def _amount_at(points, instant: datetime, currency: str) -> Decimal:
    """The MRR just before ``instant``, independently of the walk."""
    before = [p for p in points if p.at < instant]
    mrr = before[-1].mrr if before else None
    return mrr.amount if mrr is not None and mrr.currency == currency else D(0)
