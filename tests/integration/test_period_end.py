"""The period-end warning on a simulated clock: a day before the period ends, customers
whose forecast exceeds their included units or quota are told once."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

from schemas.notifications import NotificationType, notification_id
from services.billing.invoicing import pace
from services.billing.notification.period_end import PeriodEndWarning
from tests.billing_support import at, record_usage, subscribe
from tests.notification_support import published

END = at("2026-12-01")
FORECAST = NotificationType.USAGE_FORECAST_OVERAGE


def job(pool, redis, ch, now: datetime) -> PeriodEndWarning:
    # Small pages: the pass walks the shared test database a few customers at a time
    # (other tests' customers too, some on plans pricing distinct counts: chDB answers).
    return PeriodEndWarning(
        pool, redis, lambda: ch, timedelta(hours=24), clock=lambda: now, batch=7
    )


async def _starter_using(pool, customer: str, per_day: int) -> None:
    """On starter (50,000 calls included, $0.001 each beyond) since October; ``per_day``
    calls every day of November up to the 29th."""
    await subscribe(pool, customer, "starter", at("2026-10-01"))
    for day in range(1, 30):
        await record_usage(pool, customer, "api_calls", date(2026, 11, day), per_day)


async def test_a_day_before_the_end_an_overage_is_told_once(pool, redis, tenant, ch) -> None:
    customer = f"{tenant}-heavy"
    await _starter_using(pool, customer, 3_000)

    assert await job(pool, redis, ch, END - timedelta(hours=30)).run() >= 0
    assert await published(redis, tenant, FORECAST) == []  # 30 h before: not yet

    due = job(pool, redis, ch, END - timedelta(hours=23))
    await due.run()
    await due.run()  # again: nothing new
    [warning] = await published(redis, tenant, FORECAST)

    # 87,000 so far; the window is Nov 24 00:00 .. Nov 30 01:00 (145 h) with 18,000
    # calls; 23 h left -> + 18,000 x 23 / 145.
    forecast = Decimal(87_000) + Decimal(18_000) * 23 / 145
    assert warning.id == notification_id(FORECAST, customer, "2026-11-01T00:00:00Z")
    assert warning.customer == customer
    data = warning.data
    assert data["period"] == {"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"}
    assert data["meters"] == [
        {
            "meter": "api_calls",
            "usage": "87000",
            "forecast": str(forecast.quantize(Decimal("0.000001"))),
            "included": "50000",
            "quota": "50000",
        }
    ]
    overage = ((forecast - 50_000) * Decimal("0.001")).quantize(Decimal("0.01"))
    assert data["forecast_overage_amount"] == str(overage) == "39.86"
    assert Decimal(data["forecast_total"]) == Decimal("49.00") + overage  # starter's fee
    assert data["currency"] == "usd"
    assert data["method"] == pace.METHOD


async def test_below_the_included_units_nothing_is_told(pool, redis, tenant, ch) -> None:
    await _starter_using(pool, f"{tenant}-light", 100)
    assert await job(pool, redis, ch, END - timedelta(hours=23)).run() >= 0
    assert await published(redis, tenant) == []


async def test_a_hard_quota_forecast_to_be_exceeded_is_told(pool, redis, tenant, ch) -> None:
    # free: 1,000 calls included and a hard quota of 1,000; 970 by the 29th, 45 a day
    # lately: + 270 x 23 / 145 = 42.8 more by the end.
    customer = f"{tenant}-free"
    await subscribe(pool, customer, "free", at("2026-10-01"))
    await record_usage(pool, customer, "api_calls", date(2026, 11, 1), 700)
    for day in range(24, 30):
        await record_usage(pool, customer, "api_calls", date(2026, 11, day), 45)
    await job(pool, redis, ch, END - timedelta(hours=23)).run()
    [warning] = await published(redis, tenant, FORECAST)
    [meter] = warning.data["meters"]
    assert Decimal(meter["usage"]) == 970
    assert round(Decimal(meter["forecast"]), 1) == Decimal("1012.8")
    assert warning.data["forecast_overage_amount"] == "0.00"  # free: refused, not billed
