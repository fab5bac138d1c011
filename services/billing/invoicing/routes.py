"""Invoices over HTTP: a customer's invoices, the upcoming one, its credit notes.

A service token reads any customer's; a customer's API key with ``usage:read`` reads
only its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN, utcnow
from schemas.invoices import CreditNoteList, InvoiceList, InvoiceStatus, UpcomingInvoice
from services.billing.invoicing import corrections, subscriptions
from services.billing.invoicing import reader as invoices
from services.common.auth import Authenticator
from services.common.clickhouse import ClickHouse
from services.common.openapi import problem_responses
from services.common.problems import unknown_customer

Customer = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]


def router(
    pool: AsyncConnectionPool,
    auth: Authenticator,
    clickhouse: Callable[[], ClickHouse],
) -> APIRouter:
    api = APIRouter(tags=["invoices"], responses=problem_responses(401, 403, 422, 429, 503))

    @api.get(
        "/v1/customers/{customer}/invoices",
        summary="A customer's invoices, newest first",
        responses=problem_responses(404),
    )
    async def list_invoices(
        request: Request,
        customer: Customer,
        status: InvoiceStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=120)] = 24,
    ) -> InvoiceList:
        await auth.authorize(request, Scope.USAGE_READ, customer)
        async with pool.connection() as conn:
            listed = await invoices.listed(conn, customer, status, limit)
            await _known(conn, customer, listed)
        return InvoiceList(invoices=listed)

    @api.get(
        "/v1/customers/{customer}/invoices/upcoming",
        summary="The current period's invoice so far, and a forecast to its end",
        responses=problem_responses(404),
    )
    async def upcoming_invoice(request: Request, customer: Customer) -> UpcomingInvoice:
        await auth.authorize(request, Scope.USAGE_READ, customer)
        async with pool.connection() as conn:
            found = await invoices.upcoming(conn, clickhouse, customer, utcnow())
        if found is None:
            raise unknown_customer(customer)
        return found

    @api.get(
        "/v1/customers/{customer}/credit-notes",
        summary="Credit notes for finalized invoices whose usage was corrected downwards",
        responses=problem_responses(404),
    )
    async def list_credit_notes(
        request: Request, customer: Customer, limit: Annotated[int, Query(ge=1, le=120)] = 24
    ) -> CreditNoteList:
        await auth.authorize(request, Scope.USAGE_READ, customer)
        async with pool.connection() as conn:
            listed = await corrections.credit_notes(conn, customer, limit)
            await _known(conn, customer, listed)
        return CreditNoteList(credit_notes=listed)

    return api


async def _known(conn: AsyncConnection, customer: str, listed: Sequence[object]) -> None:
    """An empty list for a customer Tally does not know is a 404 (a service token may
    name any customer); a list with something in it names one it does."""
    if not listed and not await subscriptions.exists(conn, customer):
        raise unknown_customer(customer)
