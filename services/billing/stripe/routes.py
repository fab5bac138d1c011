"""Stripe over HTTP: Checkout and the billing portal for customers, webhooks for Stripe.

Sessions are opened with a service token, or by the customer's own key with the
``billing`` scope; the answer is a Stripe-hosted URL to send the customer to.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN, utcnow
from schemas.plans import PLAN_ID_PATTERN
from services.billing.stripe.sessions import Session, Sessions
from services.billing.stripe.webhooks import Webhooks
from services.common import bodies
from services.common.auth import Authenticator
from services.common.openapi import problem_responses

Customer = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Annotated[str, Field(pattern=PLAN_ID_PATTERN)]
    success_url: AnyHttpUrl = Field(description="Where Stripe sends the customer after paying.")
    cancel_url: AnyHttpUrl = Field(description="Where Stripe sends the customer on cancel.")


class PortalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    return_url: AnyHttpUrl = Field(description="Where the portal's back link goes.")


class WebhookReceipt(BaseModel):
    received: bool
    outcome: str = Field(description="What the event did: applied, ignored, duplicate…")


def router(auth: Authenticator, sessions: Sessions, webhooks: Webhooks) -> APIRouter:
    api = APIRouter(tags=["stripe"], responses=problem_responses(503))
    session_problems = problem_responses(401, 403, 404, 422, 429, 502)

    @api.post(
        "/v1/customers/{customer}/billing/checkout",
        status_code=201,
        summary="A Stripe Checkout page subscribing the customer to a plan",
        responses=session_problems | problem_responses(409),
    )
    async def checkout(request: Request, customer: Customer, body: CheckoutRequest) -> Session:
        await auth.authorize(request, Scope.BILLING, customer)
        return await sessions.checkout(
            customer, body.plan, str(body.success_url), str(body.cancel_url), utcnow()
        )

    @api.post(
        "/v1/customers/{customer}/billing/portal",
        status_code=201,
        summary="A Stripe billing-portal page: pay, change the card, see invoices, cancel",
        responses=session_problems,
    )
    async def portal(request: Request, customer: Customer, body: PortalRequest) -> Session:
        await auth.authorize(request, Scope.BILLING, customer)
        return await sessions.portal(customer, str(body.return_url))

    @api.post(
        "/v1/stripe/webhook", summary="Stripe's events (signed)", responses=problem_responses(400)
    )
    async def stripe_webhook(request: Request) -> WebhookReceipt:
        async with bodies.arriving(bodies.BODY_SECONDS):
            body = await request.body()
        receipt = await webhooks.receive(body, request.headers.get("stripe-signature"))
        return WebhookReceipt.model_validate(receipt)

    return api
