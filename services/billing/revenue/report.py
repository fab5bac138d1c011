"""The whole revenue view at one instant: what the JSON API answers and the page shows.

Every customer's history is read in pages of ``BATCH`` (in id order, as the billing run
reads them) and walked once into MRR now, the months' movements and the trials; the
rest are grouped queries over invoices and customers, and this month's counters.  One
REPEATABLE READ snapshot, so the figures agree with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.revenue import (
    CurrencyMovements,
    CurrencyMrr,
    MrrMonth,
    Revenue,
    TopByRevenue,
    TrialMonth,
    Trials,
)
from schemas.windows import Window, bucket_start, next_bucket
from services.billing.invoicing import subscriptions
from services.billing.invoicing.periods import months_before
from services.billing.rating.money import exponent
from services.billing.revenue import ledgers, live_usage, movements, mrr, trials, usage_revenue
from services.billing.revenue.movements import Flows, Month, Movement
from services.common import catalog

BATCH = 5000
TRAILING = 12  # months of invoices the top customers by revenue are ranked on


def calendar_months(now: datetime, count: int) -> list[Month]:
    """The ``count`` calendar months (UTC) up to and including ``now``'s, oldest first."""
    start = bucket_start(Window.MONTH, now)
    found = []
    for _ in range(count):
        found.append((start, next_bucket(Window.MONTH, start)))
        start = bucket_start(Window.MONTH, start - timedelta(days=1))
    return found[::-1]


def label(month: Month) -> str:
    return month[0].strftime("%Y-%m")


class _Histories:
    """Every customer's history walked once: MRR now, movements, trials."""

    def __init__(self, book: mrr.FeeBook, months: Sequence[Month], now: datetime) -> None:
        self.book, self.months, self.now = book, months, now
        self.flows: Flows = {}
        self.now_by_currency: dict[str, list[Decimal]] = {}
        self.trials = [trials.TrialMonth() for _ in months]
        self.running = 0

    def add(self, batch: Sequence[subscriptions.Subscription]) -> None:
        timelines = [mrr.timeline(s.states, self.book) for s in batch]
        movements.monthly(timelines, self.months, self.flows)
        for points in timelines:
            worth = mrr.at(points, self.now)
            if worth is not None:
                self.now_by_currency.setdefault(worth.currency, []).append(worth.amount)
        trials.monthly((s.states for s in batch), self.book, self.months, self.trials)
        self.running += sum(1 for s in batch if s.state_at(self.now).status == trials.TRIAL)


async def _walk(conn: AsyncConnection, months: Sequence[Month], now: datetime) -> _Histories:
    walked = _Histories(await mrr.fee_book(conn), months, now)
    after = ""
    while batch := await subscriptions.page(conn, after, BATCH):
        walked.add(batch)
        after = batch[-1].customer
    return walked


def _mrr_now(walked: _Histories) -> list[CurrencyMrr]:
    found = []
    for currency in sorted(walked.now_by_currency):
        amounts = walked.now_by_currency[currency]
        total = sum(amounts, Decimal(0))
        step = Decimal(1).scaleb(-exponent(currency))
        arpu = (total / len(amounts)).quantize(step, rounding=ROUND_HALF_UP)
        found.append(
            CurrencyMrr(
                currency=currency,
                mrr=total,
                arr=total * 12,
                paying_customers=len(amounts),
                arpu=arpu,
            )
        )
    return found


def _movements(walked: _Histories) -> list[CurrencyMovements]:
    current = len(walked.months) - 1
    return [
        CurrencyMovements(
            currency=currency,
            months=[
                MrrMonth(
                    month=label(month),
                    to_date=index == current,
                    starting=flow.starting,
                    new=flow.moved[Movement.NEW],
                    expansion=flow.moved[Movement.EXPANSION],
                    contraction=flow.moved[Movement.CONTRACTION],
                    churn=flow.moved[Movement.CHURN],
                    reactivation=flow.moved[Movement.REACTIVATION],
                    ending=flow.ending,
                    new_customers=flow.customers[Movement.NEW],
                    churned_customers=flow.customers[Movement.CHURN],
                    reactivated_customers=flow.customers[Movement.REACTIVATION],
                )
                for index, (month, flow) in enumerate(zip(walked.months, flows, strict=True))
            ],
        )
        for currency, flows in sorted(walked.flows.items())
    ]


def _trials(walked: _Histories) -> Trials:
    whole = trials.TrialMonth(
        started=sum(m.started for m in walked.trials),
        converted=sum(m.converted for m in walked.trials),
        expired=sum(m.expired for m in walked.trials),
    )
    return Trials(
        running=walked.running,
        started=whole.started,
        converted=whole.converted,
        expired=whole.expired,
        conversion_rate=whole.conversion_rate,
        months=[
            TrialMonth(
                month=label(month),
                started=m.started,
                converted=m.converted,
                expired=m.expired,
                conversion_rate=m.conversion_rate,
            )
            for month, m in zip(walked.months, walked.trials, strict=True)
        ],
    )


async def build(pool: AsyncConnectionPool, redis: Redis, months: int, now: datetime) -> Revenue:
    """The revenue view over the last ``months`` calendar months, as of ``now``."""
    window = calendar_months(now, months)
    labels = [label(m) for m in window]
    since = months_before(now.date(), TRAILING - 1).strftime("%Y-%m")
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        walked = await _walk(conn, window, now)
        plans = await ledgers.by_plan(conn)
        meters = await catalog.meters(conn)
        return Revenue(
            as_of=now,
            months=labels,
            customers=sum(p.customers for p in plans),
            mrr=_mrr_now(walked),
            movements=_movements(walked),
            usage_revenue=await usage_revenue.by_month(conn, labels),
            customers_by_plan=plans,
            trials=_trials(walked),
            usage_this_month=await live_usage.this_month(conn, redis, meters, now),
            top_by_revenue=TopByRevenue(
                since=since, currencies=await ledgers.top_by_revenue(conn, since)
            ),
            past_due=await ledgers.past_due(conn),
        )
