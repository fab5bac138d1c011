"""The delivery log over HTTP, and resend.

``GET /v1/customers/{c}/notifications`` pages newest first (``cursor`` from the previous
page's ``next_cursor``); ``POST /v1/notifications/{id}/resend`` makes every delivery of a
notification due again now (202), keeping the attempts already logged.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN
from schemas.text import PRINTABLE_PATTERN
from services.billing.notification import history
from services.billing.notification.access import Access
from services.billing.notification.history import NotificationLog
from services.common.openapi import problem_responses
from services.common.problems import invalid_parameter

Customer = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]
NotificationId = Annotated[str, Path(max_length=64, pattern=PRINTABLE_PATTERN)]
CURSOR_SEPARATOR = "~"


class NotificationPage(BaseModel):
    notifications: list[NotificationLog]
    next_cursor: str | None  # pass as ?cursor= for the next (older) page


class Resent(BaseModel):
    notification_id: str
    deliveries: int  # how many deliveries are due again


def router(pool: AsyncConnectionPool, access: Access, wake: asyncio.Event) -> APIRouter:
    api = APIRouter(tags=["webhooks"], responses=problem_responses(401, 403, 422, 429, 503))

    @api.get(
        "/v1/customers/{customer}/notifications",
        summary="A customer's notifications, newest first, with deliveries and attempts",
    )
    async def list_notifications(
        request: Request,
        customer: Customer,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> NotificationPage:
        caller = await access.customer(request, customer, Scope.USAGE_READ)
        before = _cursor(cursor) if cursor else None
        async with pool.connection() as conn:
            found = await history.page(conn, customer, limit, before, own=not caller.service)
        last = found[-1] if len(found) == limit else None
        return NotificationPage(
            notifications=found,
            next_cursor=(
                f"{last.created_at.isoformat()}{CURSOR_SEPARATOR}{last.id}" if last else None
            ),
        )

    @api.get(
        "/v1/notifications/{notification}",
        summary="One notification with its deliveries and attempts",
        responses=problem_responses(404),
    )
    async def get_notification(request: Request, notification: NotificationId) -> NotificationLog:
        caller = await access.caller(request)
        async with pool.connection() as conn:
            customer = await history.customer_of(conn, notification)
            await access.require(caller, customer, Scope.USAGE_READ)
            return await history.one(conn, notification, own=not caller.service)

    @api.post(
        "/v1/notifications/{notification}/resend",
        status_code=202,
        summary="Deliver a notification again on every channel, now",
        responses=problem_responses(404),
    )
    async def resend(request: Request, notification: NotificationId) -> Resent:
        caller = await access.caller(request)
        async with pool.connection() as conn, conn.transaction():
            customer = await history.customer_of(conn, notification)
            await access.require(caller, customer, Scope.KEYS)
            count = await history.resend(conn, notification, own=not caller.service)
        wake.set()
        return Resent(notification_id=notification, deliveries=count)

    return api


def _cursor(raw: str) -> tuple[datetime, str]:
    at, sep, last_id = raw.partition(CURSOR_SEPARATOR)
    try:
        if not sep or not last_id:
            raise ValueError("no id")
        return datetime.fromisoformat(at), last_id
    except ValueError:
        raise invalid_parameter("cursor", "not a cursor this API returned") from None
