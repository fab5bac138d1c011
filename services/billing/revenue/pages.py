"""The revenue dashboard for the seller: ``/admin`` (sign in with the admin token),
``/admin/revenue`` (the page), ``/admin/logout``.

Signing in sets a session cookie signed under ``TALLY_PORTAL_SECRET`` (purpose
``admin-session``): HttpOnly, SameSite=Strict, scoped to ``/admin``, Secure when Tally
is served over https, valid for ``SESSION_HOURS``.  A wrong token is a failed
credential like any other (the per-address limiter counts it).  The page carries every
number in its tables; the chart is drawn by a static script (``/static/revenue/revenue.js``) from
JSON embedded in the page, so the page runs under ``Content-Security-Policy:
default-src 'self'`` (and ``frame-ancestors 'none'``: nobody frames it).
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.events import utcnow
from schemas.revenue import Revenue
from services.billing.revenue import report
from services.common.auth import Authenticator, address
from services.common.pages import (
    CROSS_SITE,
    cross_site,
    form_field,
    page_templates,
    root_path,
)
from services.common.problems import Problem
from services.common.settings import Settings
from services.common.signed import Signer

HERE = Path(__file__).resolve().parent
COOKIE = "tally_admin"
SESSION_HOURS = 12
MONTHS = 12
STATUSES = ("trial", "active", "past_due", "suspended", "cancelled")
HEADERS = {
    "Cache-Control": "no-store",
    # frame-ancestors is not covered by default-src: no one frames the seller's page
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
templates = page_templates(HERE / "templates")
templates.env.filters["money"] = lambda amount: f"{Decimal(amount):,}"


def chart_data(revenue: Revenue) -> list[dict[str, Any]]:
    """Per currency, the series the chart draws: month starts (Unix seconds), ending MRR,
    what was gained (new + expansion + reactivation) and lost (contraction + churn)."""
    return [
        {
            "currency": block.currency,
            "months": [m.month for m in block.months],
            "ending": [str(m.ending) for m in block.months],
            "gained": [str(m.new + m.expansion + m.reactivation) for m in block.months],
            "lost": [str(-(m.contraction + m.churn)) for m in block.months],
        }
        for block in revenue.movements
    ]


def by_plan(revenue: Revenue) -> dict[str, dict[str, int]]:
    """Customers per plan, then per status: the table's rows."""
    found: dict[str, dict[str, int]] = {}
    for row in revenue.customers_by_plan:
        found.setdefault(row.plan, {})[row.status] = row.customers
    return found


class Session:
    """The seller's signed session cookie."""

    def __init__(self, settings: Settings) -> None:
        self._signer = Signer(settings.portal_secret, "admin-session")
        self._secure = settings.public_url.startswith("https://")

    def valid(self, request: Request) -> bool:
        token = request.cookies.get(COOKIE)
        return bool(token) and self._signer.verify(token or "") is not None

    def open(self, response: Response) -> None:
        lifetime = timedelta(hours=SESSION_HOURS)
        response.set_cookie(
            COOKIE,
            self._signer.sign({"sub": "admin"}, lifetime),
            max_age=int(lifetime.total_seconds()),
            path="/admin",
            httponly=True,
            samesite="strict",
            secure=self._secure,
        )

    def close(self, response: Response) -> None:
        response.delete_cookie(
            COOKIE, path="/admin", httponly=True, samesite="strict", secure=self._secure
        )


def router(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, auth: Authenticator
) -> APIRouter:
    pages = APIRouter(include_in_schema=False)
    session = Session(settings)

    def login(request: Request, error: str = "", status: int = 200, **headers: str) -> Response:
        context = {"title": "Tally admin", "root": root_path(request), "error": error}
        return templates.TemplateResponse(
            request, "admin_login.html", context, status_code=status, headers=HEADERS | headers
        )

    def to(request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(root_path(request) + path, status_code=303, headers=HEADERS)

    @pages.get("/admin", response_class=HTMLResponse)
    async def admin(request: Request) -> Response:
        return to(request, "/admin/revenue") if session.valid(request) else login(request)

    @pages.post("/admin/login", response_class=HTMLResponse)
    async def sign_in(request: Request) -> Response:
        if cross_site(request):
            return login(request, CROSS_SITE, 403)
        token = await form_field(request, "token")
        try:
            await auth.admin(token or None, address(request))
        except Problem as problem:
            retry = problem.headers.get("Retry-After")
            extra = {"Retry-After": retry} if retry else {}
            message = "Wrong admin token." if problem.status == 401 else problem.detail
            return login(request, message, problem.status, **extra)
        response = to(request, "/admin/revenue")
        session.open(response)
        return response

    @pages.post("/admin/logout", response_class=HTMLResponse)
    async def sign_out(request: Request) -> Response:
        if cross_site(request):
            return login(request, CROSS_SITE, 403)
        response = to(request, "/admin")
        session.close(response)
        return response

    @pages.get("/admin/revenue", response_class=HTMLResponse)
    async def revenue(request: Request) -> Response:
        if not session.valid(request):
            return to(request, "/admin")
        found = await report.build(pool, redis, MONTHS, utcnow())
        context = {
            "title": "Revenue · Tally",
            "root": root_path(request),
            "r": found,
            "chart": orjson.dumps(chart_data(found)).decode().replace("<", "\\u003c"),
            "statuses": STATUSES,
            "by_plan": by_plan(found),
        }
        return templates.TemplateResponse(request, "revenue.html", context, headers=HEADERS)

    return pages
