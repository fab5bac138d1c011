"""The pages every Tally process serves besides its API: ``/`` (what this is, and where
to go), and the API reference at ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc).

FastAPI's own docs pages load their scripts from a CDN, so they are blank on a machine
without internet; here the scripts are vendored under ``static/`` (see its README) and
served by the process itself.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Scope

from services.common import bodies

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
templates = Jinja2Templates(directory=TEMPLATES)


def page_templates(own: Path) -> Jinja2Templates:
    """Templates from a service's own folder that may extend the common ``base.html``
    (the page shell and ``/static/tally.css``), so every page looks like one product."""
    return Jinja2Templates(directory=[own, TEMPLATES])


class _StaticFiles(StaticFiles):
    """Static files whose 405 names the methods they are served with, as routes' do."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(405, headers={"Allow": "GET, HEAD"})
        return await super().get_response(path, scope)


def install(app: FastAPI) -> None:
    """Serve ``/static/`` and the pages on ``app`` (created with ``docs_url=None`` and
    ``redoc_url=None``, so that FastAPI's CDN-bound pages are not there too)."""
    app.mount("/static", _StaticFiles(directory=STATIC), name="static")
    app.include_router(router())


def root_path(request: Request) -> str:
    """The path prefix a proxy serves this process under (``--root-path``), if any."""
    return str(request.scope.get("root_path", "")).rstrip("/")


MAX_FORM_BYTES = 4096
"""A sign-in form carries one short field: anything longer is not one."""


async def form_field(request: Request, name: str) -> str:
    """Field ``name`` of a small urlencoded form, stripped; empty when absent or when
    the body is larger than a sign-in form can be."""
    async with bodies.arriving(bodies.BODY_SECONDS):
        body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return ""
    return (parse_qs(body.decode("utf-8", "replace")).get(name) or [""])[0].strip()


CROSS_SITE = "Sign in from this page: a sign-in form posted from another site is refused."


def cross_site(request: Request) -> bool:
    """A form posted from another site's page (login CSRF: signing a browser in as
    someone else). Browsers say so in ``Sec-Fetch-Site``; older ones send an ``Origin``
    that names another host. Requests without either (curl, tests) are not browsers'."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc != request.headers.get("host", "")


def router() -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    @pages.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        context = {"title": request.app.title, "root": root_path(request)}
        return templates.TemplateResponse(request, "index.html", context)

    @pages.get("/docs", response_class=HTMLResponse)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = root_path(request)
        return get_swagger_ui_html(
            openapi_url=root + request.app.openapi_url,
            title=f"{request.app.title} API",
            swagger_js_url=f"{root}/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/tally.svg",
            swagger_ui_parameters={"validatorUrl": None},  # no badge from swagger.io
        )

    @pages.get("/redoc", response_class=HTMLResponse)
    async def redoc(request: Request) -> HTMLResponse:
        root = root_path(request)
        return get_redoc_html(
            openapi_url=root + request.app.openapi_url,
            title=f"{request.app.title} API",
            redoc_js_url=f"{root}/static/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}/static/tally.svg",
            with_google_fonts=False,
        )

    return pages
