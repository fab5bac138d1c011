"""The customer dashboard's pages: ``/portal`` and the ways in and out of it.

- ``GET /portal?token=…`` checks a portal token, opens a session (an HttpOnly cookie,
  signed for another purpose, expiring with the token) and redirects to ``/portal``, so
  the token leaves the address bar, the history and the logs.  A bad, forged or expired
  token gets a 401 page saying so.
- ``GET /portal`` shows the dashboard to a session, else the sign-in form.
- ``POST /portal/login`` takes a customer's API key (form field ``api_key``).  A wrong
  key is a failed credential like any other (``services.common.auth``): the form again
  with a 401, and an address that keeps guessing gets 429.  A key's session ends when the
  key is revoked or expires: it is checked on every page.
- ``POST /portal/logout`` ends the session.

Every answer is ``Cache-Control: no-store`` and carries a Content-Security-Policy that
allows nothing but this origin: no inline script, no other host.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from schemas.api_keys import Scope
from services.api.portal import figures, tokens
from services.api.portal.tokens import Grant
from services.api.portal.view import TOP, Dashboard, DashboardView
from services.common.auth import Authenticator, Caller, address
from services.common.pages import (
    CROSS_SITE,
    cross_site,
    form_field,
    page_templates,
    root_path,
)
from services.common.problems import Problem
from services.common.settings import Settings

COOKIE = "tally_portal"
BAD_TOKEN = (
    "This dashboard link is not valid: it has expired, been revoked, or was altered."
    " Ask for a new link, or sign in with your API key."
)
SERVICE_TOKEN = (
    "That is one of the seller's service tokens, not a customer's API key:"
    " mint a dashboard link with POST /v1/customers/{id}/portal-tokens instead."
)

templates = page_templates(Path(__file__).parent / "templates")
templates.env.filters.update(
    num=figures.number,
    estimate=figures.estimate,
    per=figures.per,
    day=figures.day,
    instant=figures.instant,
    level=figures.level,
    width=figures.width,
)
templates.env.globals["cash"] = figures.money


def router(settings: Settings, auth: Authenticator, view: DashboardView) -> APIRouter:
    pages = APIRouter(include_in_schema=False)
    secure = settings.public_url.startswith("https://")
    policy = _policy(settings.portal_frame_ancestors)

    def page(
        request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> HTMLResponse:
        context = {"root": root_path(request), "title": "Usage dashboard", **context}
        reply = templates.TemplateResponse(request, name, context, status_code=status)
        _protect(reply, policy)
        return reply

    def sign_in(request: Request, error: str | None = None, status: int = 200) -> HTMLResponse:
        reply = page(request, "login.html", {"error": error}, status)
        if error is not None:
            reply.delete_cookie(COOKIE, path=_path(request))
        return reply

    def enter(request: Request, grant: Grant) -> Response:
        """A session for ``grant``, and on to the dashboard without the token."""
        reply = RedirectResponse(_path(request), status_code=303)
        seconds = int((grant.expires_at - datetime.now(UTC)).total_seconds())
        reply.set_cookie(
            COOKIE,
            tokens.open_session(settings, grant),
            max_age=max(seconds, 1),
            path=_path(request),
            secure=secure,
            httponly=True,
            samesite="lax",
        )
        _protect(reply, policy)
        return reply

    @pages.get("/portal", response_class=HTMLResponse)
    async def portal(request: Request, token: str | None = None) -> Response:
        if token is not None:
            grant = tokens.verify_token(settings, token)
            return sign_in(request, BAD_TOKEN, 401) if grant is None else enter(request, grant)
        cookie = request.cookies.get(COOKIE)
        if cookie is None:
            return sign_in(request)
        grant = tokens.verify_session(settings, cookie)
        if grant is None:
            return sign_in(request, "Your session has ended: sign in again.", 401)
        try:
            if grant.key_id is not None:  # a key's session lasts as long as the key works
                caller = Caller(grant.customer, grant.key_id)
                await auth.require(caller, grant.customer, Scope.USAGE_READ)
            board = await view.gather(request, grant)
        except Problem as problem:
            if problem.status not in (401, 403, 404):
                raise
            return sign_in(request, problem.detail, problem.status)
        return page(request, "portal.html", _context(board, grant))

    @pages.post("/portal/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        if cross_site(request):
            return sign_in(request, CROSS_SITE, 403)
        key = await form_field(request, "api_key")
        if not key:
            return sign_in(request, "Paste your API key (tally_live_… or tally_test_…).", 401)
        try:
            caller = await auth.caller(key, address(request))
            if caller.customer is None:
                return sign_in(request, SERVICE_TOKEN, 401)
            await auth.require(caller, caller.customer, Scope.USAGE_READ)
        except Problem as problem:
            reply = sign_in(request, problem.detail, problem.status)
            if "Retry-After" in problem.headers:  # an address that keeps guessing
                reply.headers["Retry-After"] = problem.headers["Retry-After"]
            return reply
        lifetime = timedelta(seconds=settings.portal_token_ttl_seconds)
        grant = Grant(caller.customer, None, tokens.expiry(lifetime), key_id=caller.key_id)
        return enter(request, grant)

    @pages.post("/portal/logout", response_class=HTMLResponse)
    async def logout(request: Request) -> Response:
        if cross_site(request):
            return sign_in(request, CROSS_SITE, 403)
        reply = RedirectResponse(_path(request), status_code=303)
        reply.delete_cookie(COOKIE, path=_path(request))
        _protect(reply, policy)
        return reply

    return pages


def _path(request: Request) -> str:
    return f"{root_path(request)}/portal"


def _policy(frame_ancestors: str) -> str:
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " object-src 'none'; base-uri 'none'; form-action 'self';"
        f" frame-ancestors {frame_ancestors}"
    )


def _protect(reply: Response, policy: str) -> None:
    reply.headers["Cache-Control"] = "no-store"
    reply.headers["Content-Security-Policy"] = policy
    reply.headers["Referrer-Policy"] = "no-referrer"
    reply.headers["X-Content-Type-Options"] = "nosniff"


def _context(board: Dashboard, grant: Grant) -> dict[str, Any]:
    chart = {
        "series": [
            {
                "meter": s.meter,
                "unit": s.unit,
                "t": [int(day.timestamp()) for day, _ in s.days],
                "v": [str(value) for _, value in s.days],
            }
            for s in board.series
        ]
    }
    return {
        "board": board,
        "top": TOP,
        "restricted": grant.meters,
        "via_key": grant.key_id is not None,
        "expires_at": grant.expires_at,
        "chart": chart,
    }
