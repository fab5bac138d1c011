"""``POST /v1/stripe/webhook``: Stripe's word on payments and subscriptions.

An event is accepted only with a valid ``Stripe-Signature`` no older than 300 s (else
400, and nothing changes).  Its id goes into ``stripe_inbox`` in the same transaction
that applies it, so a redelivery finds the row and changes nothing.  Events about a
customer are applied only if no newer one was (Stripe does not promise order): a late
``customer.subscription.updated`` cannot undo the cancellation that overtook it.

What each event does:
- ``checkout.session.completed`` with ``payment_status`` ``paid`` or
  ``no_payment_required``, and ``checkout.session.async_payment_succeeded``: the customer
  (``client_reference_id``) moves to the plan in its metadata, active, and the session's
  Stripe customer becomes the customer's, so that its later events are applied;
- ``checkout.session.completed`` still unpaid (a delayed payment method) and
  ``checkout.session.async_payment_failed``: recorded, nothing changes;
- ``customer.subscription.updated``: status and plan (from its prices' ``tally_plan``,
  else its metadata) follow Stripe's, unless the subscription was never paid
  (``incomplete``, ``incomplete_expired``);
- ``customer.subscription.deleted``: back to the downgrade plan (free);
- ``invoice.paid``: the invoice is paid, a past-due customer is active again; the
  subscription's first invoice (``billing_reason`` ``subscription_create``) moves the
  customer to the subscription's plan, active;
- ``invoice.payment_failed``: the invoice failed, the customer is past due.
After a change, the customer's enforcement state in Redis is dropped; the next decision
reads it afresh from PostgreSQL.

Once the transaction commits, what it decided is told (``notices``): ``payment.failed``
for ``invoice.payment_failed`` (the account is now past due), ``plan.changed`` when the
plan moved, each with the Stripe event's id in its stable id.  A crash between the
commit and the publish loses a ``plan.changed`` (Stripe's redelivery finds the event
applied and says nothing); a lost ``payment.failed`` is told by the billing service's
next lifecycle pass (``notices.retell``).  Redis failing to take either is logged and
never fails the webhook.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import stripe
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.notifications import Notification
from schemas.problem_types import BAD_SIGNATURE, NOT_AN_EVENT, STRIPE_NOT_CONFIGURED
from services.api.accounts import service as accounts
from services.billing.stripe import client as stripe_client
from services.billing.stripe import notices
from services.billing.stripe.notices import Teller
from services.common.problems import Problem

TOLERANCE_SECONDS = 300
STATUSES = {
    "active": "active",
    "trialing": "trial",
    "past_due": "past_due",
    "unpaid": "past_due",
    "paused": "suspended",
}
PAID = {"paid", "no_payment_required"}  # a Checkout session's payment_status
NEVER_PAID = {"incomplete", "incomplete_expired"}  # a subscription's first payment


class Webhooks:
    def __init__(
        self, pool: AsyncConnectionPool, redis: Redis, secret: str | None, downgrade_plan: str
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._secret = secret
        self._downgrade = downgrade_plan

    async def receive(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        event = self._verified(payload, signature)
        obj: dict[str, Any] = event["data"]["object"]
        created = datetime.fromtimestamp(int(event["created"]), UTC)
        told: list[Notification] = []
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO stripe_inbox (event_id, type, created, outcome, payload)"
                " VALUES (%s, %s, %s, 'received', %s) ON CONFLICT (event_id) DO NOTHING",
                (event["id"], event["type"], created, Jsonb(event)),
            )
            if cur.rowcount == 0:
                return {"received": True, "outcome": "duplicate"}
            customer, outcome = await self._apply(
                conn, event["type"], obj, created, Teller(event["id"], created, told)
            )
            await conn.execute(
                "UPDATE stripe_inbox SET outcome = %s WHERE event_id = %s", (outcome, event["id"])
            )
        if customer is not None:
            await self._redis.delete(redis_keys.account(customer))
        for note in told:
            await accounts.tell(self._redis, note, notices.REMEMBER)
        return {"received": True, "outcome": outcome}

    def _verified(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        if not self._secret:
            raise Problem(
                STRIPE_NOT_CONFIGURED,
                "set STRIPE_WEBHOOK_SECRET to receive Stripe's webhooks",
            )
        if not signature:
            raise _bad_signature("the Stripe-Signature header is missing")
        try:
            stripe.WebhookSignature.verify_header(
                payload.decode(), signature, self._secret, TOLERANCE_SECONDS
            )
            event: dict[str, Any] = orjson.loads(payload)
        except stripe.SignatureVerificationError as exc:
            raise _bad_signature(str(exc.user_message or exc)) from None
        except (UnicodeDecodeError, orjson.JSONDecodeError):
            raise _not_an_event("the payload is not JSON") from None
        if not _is_event(event):
            raise _not_an_event("expected an object with id, type, created and data.object")
        return event

    async def _apply(
        self,
        conn: AsyncConnection,
        kind: str,
        obj: dict[str, Any],
        created: datetime,
        teller: Teller,
    ) -> tuple[str | None, str]:
        """The customer the event changed (if any) and what became of the event."""
        customer = await _customer_of(conn, kind, obj)
        if customer is None:
            return None, "ignored: no Tally customer"
        unpaid = _unpaid(kind, obj)
        if unpaid is not None:
            return None, unpaid
        if not await _newest(conn, customer, created):
            return None, "stale: a newer event was applied"
        metadata = obj.get("metadata") or {}
        match kind:
            case "checkout.session.completed" | "checkout.session.async_payment_succeeded":
                await _adopt_stripe_customer(conn, customer, obj.get("customer"))
                return customer, await _change(
                    conn, customer, metadata.get("plan"), "active", teller
                )
            case "customer.subscription.updated" if obj.get("status") == "canceled":
                return customer, await _change(conn, customer, self._downgrade, "active", teller)
            case "customer.subscription.updated":
                status = STATUSES.get(str(obj.get("status")))
                return customer, await _change(
                    conn, customer, _subscribed_plan(obj), status, teller
                )
            case "customer.subscription.deleted":
                return customer, await _change(conn, customer, self._downgrade, "active", teller)
            case "invoice.paid":
                await _invoice_status(conn, obj, "paid")
                plan = _subscription_started(obj)
                if plan is not None:
                    return customer, await _change(conn, customer, plan, "active", teller)
                return customer, await _recover(conn, customer, teller)
            case "invoice.payment_failed":
                await _invoice_status(conn, obj, "payment_failed")
                outcome = await _change(conn, customer, None, "past_due", teller)
                teller.payment_failed(customer, obj)
                return customer, outcome
        return None, f"ignored: {kind} is not handled"


def _unpaid(kind: str, obj: dict[str, Any]) -> str | None:
    """Why an event about a customer changes nothing because nobody has paid yet, else
    None.  Such an event is acknowledged and kept in the inbox, but does not count as the
    customer's newest: it must not make an older event that does change something stale.
    """
    match kind:
        case "checkout.session.completed" if obj.get("payment_status") not in PAID:
            return f"acknowledged: checkout payment {obj.get('payment_status') or 'missing'}"
        case "checkout.session.async_payment_failed":
            return "acknowledged: checkout payment failed"
        case "customer.subscription.updated" if obj.get("status") in NEVER_PAID:
            return f"acknowledged: subscription {obj['status']}, never paid"
    return None


def _subscription_started(invoice: dict[str, Any]) -> str | None:
    """The plan a subscription's first invoice (``billing_reason`` ``subscription_create``)
    pays for, else None.  Only the first: a late payment of an older invoice must not
    undo a plan switched or cancelled since.  Read as ``_subscribed_plan`` reads it: from
    the subscription when expanded, else from what Stripe copies onto the invoice — the
    subscription's metadata (``parent.subscription_details``; top-level
    ``subscription_details`` before API 2025-03-31) and the lines' prices."""
    if invoice.get("billing_reason") != "subscription_create":
        return None
    details = (
        (invoice.get("parent") or {}).get("subscription_details")
        or invoice.get("subscription_details")
        or {}
    )
    subscription = invoice.get("subscription") or details.get("subscription")
    if isinstance(subscription, dict):
        return _subscribed_plan(subscription)
    lines = (invoice.get("lines") or {}).get("data") or ()
    prices = [{"price": line["price"]} for line in lines if isinstance(line.get("price"), dict)]
    return _subscribed_plan({"items": {"data": prices}, "metadata": details.get("metadata")})


def _subscribed_plan(subscription: dict[str, Any]) -> str | None:
    """The plan whose mirrored prices the subscription holds (``tally_plan`` on each
    price), so a plan switched in the billing portal is followed; else the plan named
    in its metadata at checkout."""
    for item in (subscription.get("items") or {}).get("data") or ():
        plan = ((item.get("price") or {}).get("metadata") or {}).get("tally_plan")
        if plan:
            return str(plan)
    plan = (subscription.get("metadata") or {}).get("plan")
    return str(plan) if plan else None


def _is_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and isinstance(event.get("id"), str)
        and isinstance(event.get("type"), str)
        and isinstance(event.get("created"), int)
        and isinstance(event.get("data"), dict)
        and isinstance(event["data"].get("object"), dict)
    )


def _not_an_event(detail: str) -> Problem:
    return Problem(NOT_AN_EVENT, detail)


def _bad_signature(detail: str) -> Problem:
    return Problem(BAD_SIGNATURE, detail)


async def _customer_of(conn: AsyncConnection, kind: str, obj: dict[str, Any]) -> str | None:
    """The Tally customer a Checkout session names (if it exists), else the one whose
    Stripe customer the event is about."""
    if kind.startswith("checkout.session.") and obj.get("client_reference_id"):
        customer = str(obj["client_reference_id"])
        return customer if await accounts.exists(conn, customer) else None
    return await _owner_of(conn, obj.get("customer"))


async def _owner_of(conn: AsyncConnection, stripe_customer: Any) -> str | None:
    """The Tally customer a Stripe customer id is recorded for."""
    cur = await conn.execute(
        "SELECT key FROM stripe_objects WHERE kind = 'customer' AND stripe_id = %s",
        (stripe_customer,),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def _adopt_stripe_customer(
    conn: AsyncConnection, customer: str, stripe_customer: Any
) -> None:
    """Record a paid Checkout's Stripe customer as the customer's: the subscription it
    paid for lives there, so its later events must reach the customer and its usage be
    pushed there, also when the session was not opened by Tally (a payment link, a
    pricing table).  Only once paid, so an unpaid session cannot take over a customer's
    billing; never a Stripe customer already recorded for another Tally customer."""
    if not isinstance(stripe_customer, str) or not stripe_customer:
        return
    if await stripe_client.stripe_id(conn, "customer", customer) == stripe_customer:
        return
    if await _owner_of(conn, stripe_customer) is None:
        await stripe_client.remember(conn, "customer", customer, stripe_customer)


async def _newest(conn: AsyncConnection, customer: str, created: datetime) -> bool:
    """Record ``created`` as the customer's newest event, unless a newer one was applied."""
    cur = await conn.execute(
        "INSERT INTO stripe_customer_events (customer_id, created) VALUES (%s, %s)"
        " ON CONFLICT (customer_id) DO UPDATE SET created = excluded.created"
        " WHERE stripe_customer_events.created <= excluded.created",
        (customer, created),
    )
    return cur.rowcount == 1


async def _change(
    conn: AsyncConnection, customer: str, plan: str | None, status: str | None, teller: Teller
) -> str:
    try:
        changed = await accounts.follow_billing(
            conn, customer, plan, accounts.Status(status) if status else None, teller.event_id
        )
    except accounts.UnknownPlan:
        return f"ignored: unknown plan {plan!r}"
    if changed is None:
        return "ignored: no Tally customer"
    after, _, before = changed
    teller.add(accounts.plan_changed(customer, before, after, "stripe", teller.event_id, teller.at))
    return f"applied: {changed[0]}, {changed[1].value}"


async def _recover(conn: AsyncConnection, customer: str, teller: Teller) -> str:
    if await accounts.status_of(conn, customer) is accounts.Status.PAST_DUE:
        return await _change(conn, customer, None, "active", teller)
    return "applied: invoice paid"


async def _invoice_status(conn: AsyncConnection, obj: dict[str, Any], status: str) -> None:
    tally_invoice = (obj.get("metadata") or {}).get("tally_invoice")
    await conn.execute(
        "UPDATE invoices SET status = %s, paid_at = CASE WHEN %s = 'paid' THEN now() END,"
        " stripe_invoice_id = coalesce(stripe_invoice_id, %s)"
        " WHERE (id = %s OR stripe_invoice_id = %s) AND status IN ('finalized', 'payment_failed')",
        (status, status, obj.get("id"), tally_invoice, obj.get("id")),
    )
