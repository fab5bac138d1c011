"""What the dashboard shows from billing, read through billing's own JSON API.

The api service never imports billing (the import contract): it asks billing's routes,
as any client would, with one of the seller's service tokens, and parses the answers
with the models both sides share in ``schemas/``.  With ``TALLY_BILLING_URL`` set,
billing is another process reached over HTTP; unset, billing runs in this process
(``tally up``) and is asked in-process, through the application itself.

A read that fails — billing down or absent, a timeout, an answer that is not what the
contract says — is ``None``: that section of the page says "unavailable", and the rest
still renders.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from schemas.alert_rules import AlertList
from schemas.invoices import InvoiceList, UpcomingInvoice
from schemas.webhook_endpoints import EndpointList
from services.common.logging import get_logger
from services.common.settings import Settings

log = get_logger("tally.portal")

TIMEOUT_SECONDS = 5.0
RECENT_INVOICES = 5
Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class BillingView:
    """Each of billing's answers for one customer, or None where it could not be read."""

    upcoming: UpcomingInvoice | None
    invoices: InvoiceList | None
    alerts: AlertList | None
    endpoints: EndpointList | None


class BillingReads:
    def __init__(self, settings: Settings) -> None:
        self._url = settings.billing_url
        self._token = settings.service_tokens[0] if settings.service_tokens else ""

    async def read(self, request: Request, customer: str) -> BillingView:
        """Billing's four answers about ``customer``, asked at once."""
        path = f"/v1/customers/{customer}"
        async with self._client(request) as client:
            upcoming, invoices, alerts, endpoints = await asyncio.gather(
                _get(client, f"{path}/invoices/upcoming", UpcomingInvoice),
                _get(client, f"{path}/invoices?limit={RECENT_INVOICES}", InvoiceList),
                _get(client, f"{path}/alerts", AlertList),
                _get(client, f"{path}/webhook-endpoints", EndpointList),
            )
        return BillingView(upcoming, invoices, alerts, endpoints)

    @asynccontextmanager
    async def _client(self, request: Request) -> AsyncIterator[httpx.AsyncClient]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if self._url:
            base, transport = self._url, None
        else:  # billing in this process: the application that serves this request
            base, transport = (
                "http://billing.local",
                httpx.ASGITransport(app=request.app, raise_app_exceptions=False),
            )
        async with httpx.AsyncClient(
            base_url=base, transport=transport, headers=headers, timeout=TIMEOUT_SECONDS
        ) as client:
            yield client


async def _get(client: httpx.AsyncClient, path: str, model: type[Model]) -> Model | None:
    try:
        reply = await client.get(path)
    except httpx.HTTPError as exc:
        log.warning("billing unreadable", path=path, error=repr(exc))
        return None
    if reply.status_code != 200:
        log.warning("billing refused", path=path, status=reply.status_code)
        return None
    try:
        return model.model_validate_json(reply.content)
    except ValidationError as exc:
        log.warning("billing answered off-contract", path=path, error=str(exc))
        return None
