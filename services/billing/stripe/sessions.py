"""Checkout (to subscribe or upgrade) and the customer portal (to pay, change the card
or cancel): the two Stripe-hosted pages a customer is sent to.

A checkout subscribes the customer's Stripe customer to the plan's mirrored prices (the
plan is synced first, so a plan edited a second ago is offered as it now is).  It names
the Tally customer (``client_reference_id``) and the plan (``metadata.plan``, on the
session and on the subscription): the webhooks read them back when Stripe says the
customer paid.  Calendar-cycle plans anchor the subscription on the next period
start, so Stripe's invoices fall on the same days as Tally's.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import stripe
from psycopg_pool import AsyncConnectionPool

from schemas.plans import Cycle, Plan
from schemas.problem_types import ALREADY_SUBSCRIBED, STRIPE_ERROR, STRIPE_NOT_CONFIGURED
from services.billing.invoicing.periods import period_containing
from services.billing.stripe import client as stripe_client
from services.billing.stripe import mirror as stripe_mirror
from services.billing.stripe.prices import FEE, charges
from services.common import catalog
from services.common.problems import Problem, invalid_field, unknown_customer

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    url: str
    expires_at: int | None = None


class Sessions:
    def __init__(self, pool: AsyncConnectionPool, api: stripe.StripeClient | None) -> None:
        self._pool = pool
        self._api = api

    async def checkout(
        self, customer: str, plan_id: str, success_url: str, cancel_url: str, now: datetime
    ) -> Session:
        api = self._configured()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT plan_id, status FROM customers WHERE id = %s", (customer,)
            )
            account = await cur.fetchone()
            if account is None:
                raise unknown_customer(customer)
            plan = await catalog.read_plan(conn, plan_id)
            if plan is None or not plan.public:
                raise invalid_field("body.plan", f"no plan {plan_id!r} is offered")
            if not charges(plan):
                raise invalid_field(
                    "body.plan", f"plan {plan.id!r} is free: there is nothing to pay"
                )
            if tuple(account) == (plan.id, "active"):
                raise Problem(ALREADY_SUBSCRIBED, f"already on {plan.id!r}")
            prices = await _stripe(stripe_mirror.sync_plan(conn, api, plan))
            if not prices:
                raise invalid_field(
                    "body.plan", f"no price of plan {plan.id!r} is mirrored in Stripe"
                )
            stripe_customer = await _stripe(stripe_client.ensure_customer(conn, api, customer))
            await conn.commit()
        params = _checkout_params(plan, customer, stripe_customer, prices, now)
        params |= {"success_url": success_url, "cancel_url": cancel_url}
        made = await _stripe(stripe_client.call(api.v1.checkout.sessions.create, params))
        return Session(made.id, made.url, made.expires_at)

    async def portal(self, customer: str, return_url: str) -> Session:
        api = self._configured()
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT 1 FROM customers WHERE id = %s", (customer,))
            if await cur.fetchone() is None:
                raise unknown_customer(customer)
            stripe_customer = await _stripe(stripe_client.ensure_customer(conn, api, customer))
            await conn.commit()
        params = {"customer": stripe_customer, "return_url": return_url}
        made = await _stripe(stripe_client.call(api.v1.billing_portal.sessions.create, params))
        return Session(made.id, made.url)

    def _configured(self) -> stripe.StripeClient:
        if self._api is None:
            raise Problem(
                STRIPE_NOT_CONFIGURED,
                "set STRIPE_API_KEY to take payments through Stripe",
            )
        return self._api


def _checkout_params(
    plan: Plan, customer: str, stripe_customer: str, prices: dict[str, str], now: datetime
) -> dict[str, Any]:
    items = [
        {"price": price, "quantity": 1} if component == FEE else {"price": price}
        for component, price in sorted(prices.items())
    ]
    metadata = {"plan": plan.id, "tally_customer": customer}
    subscription: dict[str, Any] = {"metadata": metadata}
    if plan.cycle is Cycle.CALENDAR:
        period = period_containing(now, now.date(), plan.cycle, plan.interval)
        subscription["billing_cycle_anchor"] = int(period.end.timestamp())
    return {
        "mode": "subscription",
        "customer": stripe_customer,
        "client_reference_id": customer,
        "line_items": items,
        "metadata": metadata,
        "subscription_data": subscription,
    }


async def _stripe(pending: Awaitable[T]) -> T:
    """Await a Stripe call; Stripe's refusal becomes a 502 naming it."""
    try:
        return await pending
    except stripe.StripeError as exc:
        raise Problem(
            STRIPE_ERROR,
            exc.user_message or str(exc),
            stripe_code=exc.code,
        ) from exc
