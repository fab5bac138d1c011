"""What a person or a client meets outside the routes: the framework's errors as
problem+json, the API docs with their assets served locally (no CDN), the front page."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

from services.api import service as api_service
from services.billing.revenue import pages as revenue_pages
from services.common.settings import Settings
from services.runtime import Component, Runtime, http_app
from tests.accounts_support import random_address, running_api

SERVICE = {"Authorization": "Bearer test-token"}
ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings) as client:
        yield client


def problem(reply: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = reply.json()
    assert body["type"] == f"https://tally.dev/problems/{slug}"
    assert body["status"] == status and body["title"] and body["detail"]
    return body


async def test_not_found_is_a_problem_naming_the_path(api: httpx.AsyncClient) -> None:
    for path in ("/v1/nothing-here", "/static/nothing-here.js"):
        body = problem(await api.get(path), 404, "not-found")
        assert body["instance"] == path and body["path"] == path
        assert path in str(body["detail"])


async def test_method_not_allowed_lists_every_allowed_method(api: httpx.AsyncClient) -> None:
    """``/v1/keys`` has two routes (GET and POST): Allow names both, not only the first;
    ``/v1/enforce`` is a hot path, whose route the application still knows."""
    reply = await api.put("/v1/keys", json={}, headers=SERVICE)
    body = problem(reply, 405, "method-not-allowed")
    assert {"GET", "POST"} <= set(reply.headers["allow"].split(", "))
    assert set(body["allowed"]) == set(reply.headers["allow"].split(", "))
    assert "PUT" in str(body["detail"]) and body["instance"] == "/v1/keys"
    enforce = await api.get("/v1/enforce")
    problem(enforce, 405, "method-not-allowed")
    assert enforce.headers["allow"] == "POST"


async def test_bad_parameters_and_server_errors_are_problems(api: httpx.AsyncClient) -> None:
    bad = await api.get("/v1/customers/c/usage", params={"window": "fortnight"}, headers=SERVICE)
    assert problem(bad, 422, "invalid-parameter")["errors"]

    broken = APIRouter()

    @broken.get("/broken")
    async def fail() -> None:
        raise RuntimeError("a bug")

    app = http_app([Component("broken", [broken])])
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = problem(await client.get("/broken"), 500, "internal-error")
    assert "a bug" not in str(body)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_load_only_local_assets(api: httpx.AsyncClient, page: str) -> None:
    reply = await api.get(page)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assets = ASSET.findall(reply.text)
    assert assets and "://" not in reply.text
    kinds = {}
    for url in assets:
        assert url.startswith("/static/"), url
        asset = await api.get(url)
        assert asset.status_code == 200, url
        kinds[url.rsplit(".", 1)[-1]] = asset.headers["content-type"]
    assert "javascript" in kinds["js"]
    if page == "/docs":
        assert kinds["css"].startswith("text/css")
    assert "/openapi.json" in reply.text


@pytest.fixture
async def front(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The api service and the billing service's pages (``/admin``), as ``tally up``
    serves them both: the front page links to either."""
    async with Runtime(settings) as runtime:
        pool, redis = await runtime.pool(), runtime.redis()
        pages = revenue_pages.router(settings, pool, redis, await runtime.authenticator())
        app = http_app([await api_service.start(runtime), Component("billing", [pages])])
        transport = httpx.ASGITransport(app, client=(random_address(), 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def test_front_page_links_docs_and_operations(front: httpx.AsyncClient) -> None:
    api = front
    reply = await api.get("/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert "<title>Tally" in reply.text
    links = set(re.findall(r'<a href="([^"]+)"', reply.text))
    assert {"/docs", "/redoc", "/healthz", "/readyz", "/metrics", "/portal", "/admin"} <= links
    for link in links:
        assert (await api.get(link)).status_code in (200, 503), link  # /readyz may be 503


SIGN_INS = [("/portal/login", {"api_key": "tally_live_x"}), ("/admin/login", {"token": "x"})]


@pytest.mark.parametrize(("path", "form"), SIGN_INS)
@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://evil.example"},
    ],
)
async def test_a_sign_in_posted_from_another_site_is_refused(
    front: httpx.AsyncClient, path: str, form: dict[str, str], headers: dict[str, str]
) -> None:
    """Login CSRF: another site's page cannot sign a visitor's browser in (as anyone)."""
    reply = await front.post(path, data=form, headers=headers)
    assert reply.status_code == 403 and "another site" in reply.text
    assert "set-cookie" not in reply.headers or "Max-Age=0" in reply.headers["set-cookie"]


@pytest.mark.parametrize(("path", "form"), SIGN_INS)
@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "same-origin"}, {"Origin": "http://t"}, {}])
async def test_a_sign_in_from_the_page_itself_is_checked(
    front: httpx.AsyncClient, path: str, form: dict[str, str], headers: dict[str, str]
) -> None:
    """The form's own page (or a client that is not a browser) gets to the credential
    check: a wrong one is a 401, not the cross-site refusal."""
    reply = await front.post(path, data=form, headers=headers)
    assert reply.status_code == 401 and "another site" not in reply.text
