"""Webhook endpoints over HTTP: a customer's (``/v1/customers/{c}/webhook-endpoints``)
and the seller's own (``/v1/webhook-endpoints``, every customer's notifications).

Creating an endpoint or rotating its secret is the only time the secret is shown.
``…/test`` creates a real ``webhook.test`` notification, delivered (and logged) like any
other, to that endpoint only.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN, utcnow
from schemas.notifications import Notification, NotificationType
from schemas.text import PRINTABLE_PATTERN
from schemas.webhook_endpoints import EndpointList, EndpointOut
from services.billing.invoicing import subscriptions
from services.billing.notification import endpoints, urls
from services.billing.notification.access import Access
from services.billing.notification.endpoints import Endpoint
from services.billing.notification.intake import Intake
from services.common.openapi import problem_responses
from services.common.problems import unknown_customer
from services.common.settings import Settings

Customer = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]
EndpointId = Annotated[str, Path(max_length=64, pattern=PRINTABLE_PATTERN)]


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=urls.MAX_LENGTH, description="https URL that receives POSTs")
    events: list[str] | None = Field(
        None, max_length=32, description="Event types to send (default: all)"
    )


class EndpointWithSecret(EndpointOut):
    secret: str  # whsec_…: shown this once


class TestSent(BaseModel):
    notification_id: str


def router(
    pool: AsyncConnectionPool, access: Access, intake: Intake, settings: Settings
) -> APIRouter:
    api = APIRouter(tags=["webhooks"], responses=problem_responses(401, 403, 422, 429, 503))
    development = settings.env == "development"
    overlap = timedelta(hours=settings.webhook_secret_overlap_hours)

    async def create(conn: AsyncConnection, customer: str | None, body: EndpointIn) -> Response:
        events = endpoints.event_types(body.events)
        url = await urls.check(body.url, development)
        if customer is not None and not await subscriptions.exists(conn, customer):
            raise unknown_customer(customer)
        made, secret = await endpoints.create(
            conn, customer, url, events, settings.webhook_max_endpoints
        )
        out = EndpointWithSecret(**_out(made).model_dump(), secret=secret)
        return Response(out.model_dump_json(), status_code=201, media_type="application/json")

    @api.post(
        "/v1/customers/{customer}/webhook-endpoints",
        status_code=201,
        response_model=EndpointWithSecret,
        summary="Add a webhook endpoint; its signing secret is shown this once",
        responses=problem_responses(404, 409),
    )
    async def create_customer_endpoint(
        request: Request, customer: Customer, body: EndpointIn
    ) -> Response:
        await access.customer(request, customer, Scope.KEYS)
        async with pool.connection() as conn, conn.transaction():
            return await create(conn, customer, body)

    @api.get("/v1/customers/{customer}/webhook-endpoints", summary="A customer's endpoints")
    async def list_customer_endpoints(request: Request, customer: Customer) -> EndpointList:
        await access.customer(request, customer, Scope.KEYS)
        async with pool.connection() as conn:
            found = await endpoints.listed(conn, customer)
        return EndpointList(endpoints=[_out(e) for e in found])

    @api.delete(
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}",
        status_code=204,
        summary="Remove an endpoint; what was queued for it fails",
        responses=problem_responses(404),
    )
    async def delete_customer_endpoint(
        request: Request, customer: Customer, endpoint: EndpointId
    ) -> Response:
        await access.customer(request, customer, Scope.KEYS)
        async with pool.connection() as conn, conn.transaction():
            await endpoints.delete(conn, customer, endpoint)
        return Response(status_code=204)

    @api.post(
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}/rotate-secret",
        summary="A new secret (shown once); the old one also signs for 24 h",
        responses=problem_responses(404),
    )
    async def rotate_customer_secret(
        request: Request, customer: Customer, endpoint: EndpointId
    ) -> EndpointWithSecret:
        await access.customer(request, customer, Scope.KEYS)
        return await _rotate(customer, endpoint)

    @api.post(
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}/disable",
        summary="Stop sending to an endpoint; what was queued for it fails",
        responses=problem_responses(404),
    )
    async def disable_customer_endpoint(
        request: Request, customer: Customer, endpoint: EndpointId
    ) -> EndpointOut:
        await access.customer(request, customer, Scope.KEYS)
        return await _disable(customer, endpoint)

    @api.post(
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}/enable",
        summary="Send to a disabled endpoint again",
        responses=problem_responses(404),
    )
    async def enable_customer_endpoint(
        request: Request, customer: Customer, endpoint: EndpointId
    ) -> EndpointOut:
        await access.customer(request, customer, Scope.KEYS)
        async with pool.connection() as conn, conn.transaction():
            return _out(await endpoints.enable(conn, customer, endpoint))

    @api.post(
        "/v1/customers/{customer}/webhook-endpoints/{endpoint}/test",
        status_code=202,
        summary="Send a webhook.test notification to this endpoint only",
        responses=problem_responses(404),
    )
    async def test_customer_endpoint(
        request: Request, customer: Customer, endpoint: EndpointId
    ) -> TestSent:
        await access.customer(request, customer, Scope.KEYS)
        async with pool.connection() as conn:
            await endpoints.get(conn, customer, endpoint)
        test = Notification.decided(
            NotificationType.WEBHOOK_TEST,
            customer,
            (endpoint, uuid.uuid4().hex),
            utcnow(),
            {
                "endpoint_id": endpoint,
                "message": "A test notification from Tally: your endpoint receives webhooks.",
            },
        )
        await intake.accept([test])
        return TestSent(notification_id=test.id)

    @api.post(
        "/v1/webhook-endpoints",
        status_code=201,
        response_model=EndpointWithSecret,
        summary="Add a seller endpoint: every customer's notifications (service/admin token)",
        responses=problem_responses(409),
    )
    async def create_seller_endpoint(request: Request, body: EndpointIn) -> Response:
        await access.seller(request)
        async with pool.connection() as conn, conn.transaction():
            return await create(conn, None, body)

    @api.get("/v1/webhook-endpoints", summary="The seller's endpoints")
    async def list_seller_endpoints(request: Request) -> EndpointList:
        await access.seller(request)
        async with pool.connection() as conn:
            found = await endpoints.listed(conn, None)
        return EndpointList(endpoints=[_out(e) for e in found])

    @api.delete(
        "/v1/webhook-endpoints/{endpoint}",
        status_code=204,
        summary="Remove a seller endpoint",
        responses=problem_responses(404),
    )
    async def delete_seller_endpoint(request: Request, endpoint: EndpointId) -> Response:
        await access.seller(request)
        async with pool.connection() as conn, conn.transaction():
            await endpoints.delete(conn, None, endpoint)
        return Response(status_code=204)

    @api.post(
        "/v1/webhook-endpoints/{endpoint}/rotate-secret",
        summary="A new secret for a seller endpoint (the old one also signs for 24 h)",
        responses=problem_responses(404),
    )
    async def rotate_seller_secret(request: Request, endpoint: EndpointId) -> EndpointWithSecret:
        await access.seller(request)
        return await _rotate(None, endpoint)

    @api.post(
        "/v1/webhook-endpoints/{endpoint}/disable",
        summary="Stop sending to a seller endpoint",
        responses=problem_responses(404),
    )
    async def disable_seller_endpoint(request: Request, endpoint: EndpointId) -> EndpointOut:
        await access.seller(request)
        return await _disable(None, endpoint)

    @api.post(
        "/v1/webhook-endpoints/{endpoint}/enable",
        summary="Send to a disabled seller endpoint again",
        responses=problem_responses(404),
    )
    async def enable_seller_endpoint(request: Request, endpoint: EndpointId) -> EndpointOut:
        await access.seller(request)
        async with pool.connection() as conn, conn.transaction():
            return _out(await endpoints.enable(conn, None, endpoint))

    async def _rotate(customer: str | None, endpoint: str) -> EndpointWithSecret:
        async with pool.connection() as conn, conn.transaction():
            rotated, secret = await endpoints.rotate(conn, customer, endpoint, overlap)
        return EndpointWithSecret(**_out(rotated).model_dump(), secret=secret)

    async def _disable(customer: str | None, endpoint: str) -> EndpointOut:
        async with pool.connection() as conn, conn.transaction():
            await endpoints.get(conn, customer, endpoint)
            await endpoints.disable(conn, endpoint, "disabled by its owner")
            return _out(await endpoints.get(conn, customer, endpoint))

    return api


def _out(e: Endpoint) -> EndpointOut:
    return EndpointOut(
        id=e.id,
        customer=e.customer_id,
        url=e.url,
        events=e.event_types,
        created_at=e.created_at,
        disabled=e.disabled_at is not None,
        disabled_reason=e.disabled_reason,
        previous_secret_until=e.previous_secret_until,
    )
