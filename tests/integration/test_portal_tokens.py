"""Portal tokens: who may mint them, what a bad request is told, and which tokens the
dashboard refuses (expired, forged, signed for another purpose, or before the secret
was rotated)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.api.portal import tokens
from services.api.portal.tokens import Grant
from services.common.settings import Settings
from services.common.signed import Signer
from tests.accounts_support import ADMIN, sign_up
from tests.portal_support import SERVICE, client_of, mint, tally_app


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with tally_app(settings) as app, client_of(app) as client:
        yield client


def problem(reply: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = reply.json()
    assert str(body["type"]).endswith(f"/{slug}"), body
    return body


async def test_the_seller_mints_a_link_that_expires_when_asked(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    account = await sign_up(api)
    before = datetime.now(UTC)
    default = await mint(api, account.customer)
    short = await mint(api, account.customer, SERVICE, expires_in=120, meters=["api_calls"])
    assert default.status_code == 201, default.text
    assert short.status_code == 201, short.text
    body = default.json()
    assert body["customer"] == account.customer and body["meters"] is None
    assert body["url"] == f"{settings.public_url}/portal?token={body['token']}"
    lasts = datetime.fromisoformat(body["expires_at"]) - before
    assert timedelta(seconds=3599) <= lasts <= timedelta(seconds=3601)  # the 1 h default
    lasts = datetime.fromisoformat(short.json()["expires_at"]) - before
    assert timedelta(seconds=119) <= lasts <= timedelta(seconds=121)
    assert short.json()["meters"] == ["api_calls"]
    grant = tokens.verify_token(settings, short.json()["token"])
    assert grant is not None
    assert (grant.customer, grant.meters) == (account.customer, ("api_calls",))


async def test_bad_requests_name_the_field(api: httpx.AsyncClient) -> None:
    account = await sign_up(api)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("body.expires_in", {"expires_in": 59}),
        ("body.expires_in", {"expires_in": 30 * 86_400 + 1}),
        ("body.expires_in", {"expires_in": "an hour"}),
        ("body.meters", {"meters": []}),
        ("body.meters[1]", {"meters": ["api_calls", "no_such_meter"]}),
        ("body.scope", {"scope": "all"}),
    ]
    for field, body in cases:
        reply = await mint(api, account.customer, **body)
        found = problem(reply, 422, "invalid-request")
        named = [e["field"] for e in found["errors"]]  # type: ignore[attr-defined]
        assert named == [field], (field, found)
    unknown = await mint(api, "nobody-at-all")
    assert "nobody-at-all" in str(problem(unknown, 404, "unknown-customer")["detail"])
    bad_id = await mint(api, "not a customer!")
    problem(bad_id, 422, "invalid-request")


async def test_only_the_seller_mints(api: httpx.AsyncClient) -> None:
    account, other = await sign_up(api), await sign_up(api)
    problem(await mint(api, account.customer, {}), 401, "unauthorized")
    problem(
        await mint(api, account.customer, {"Authorization": "Bearer wrong"}), 401, "unauthorized"
    )
    own = problem(await mint(api, account.customer, account.auth), 403, "forbidden")
    assert "API key" in str(own["detail"])
    problem(await mint(api, other.customer, account.auth), 403, "forbidden")
    assert (await mint(api, account.customer, ADMIN)).status_code == 201
    assert (await mint(api, account.customer, SERVICE)).status_code == 201


async def test_the_page_refuses_bad_tokens(api: httpx.AsyncClient, settings: Settings) -> None:
    account = await sign_up(api)
    good = (await mint(api, account.customer)).json()["token"]
    grant = Grant(account.customer, None, datetime.now(UTC) + timedelta(hours=1))
    past = datetime.now(UTC) - timedelta(hours=2)
    refused = {
        "expired": Signer(settings.portal_secret, tokens.TOKEN_PURPOSE).sign(
            grant.claims(), timedelta(hours=1), past
        ),
        "forged": good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"),
        "another purpose": tokens.open_session(settings, grant),  # a session, not a token
        "another secret": Signer("someone-else", tokens.TOKEN_PURPOSE).sign(
            grant.claims(), timedelta(hours=1)
        ),
        "garbage": "not-a-token",
    }
    for what, token in refused.items():
        reply = await api.get("/portal", params={"token": token})
        assert reply.status_code == 401, what
        assert "not valid" in reply.text and "Traceback" not in reply.text, what
        assert reply.headers["content-type"].startswith("text/html"), what
        assert (
            "set-cookie" not in reply.headers or 'tally_portal=""' in reply.headers["set-cookie"]
        ), what
    # and a session cookie made from a token is not a token either way round
    api.cookies.set("tally_portal", good, path="/portal")
    reply = await api.get("/portal")
    assert reply.status_code == 401 and "session has ended" in reply.text


async def test_rotating_the_secret_revokes_links_and_sessions(settings: Settings) -> None:
    async with tally_app(settings) as app, client_of(app) as api:
        account = await sign_up(api)
        token = (await mint(api, account.customer)).json()["token"]
        entered = await api.get("/portal", params={"token": token})
        assert entered.status_code == 303
        assert (await api.get("/portal")).status_code == 200
        cookie = api.cookies["tally_portal"]
    async with tally_app(settings, portal_secret="rotated-secret") as app, client_of(app) as api:
        assert (await api.get("/portal", params={"token": token})).status_code == 401
        api.cookies.set("tally_portal", cookie, path="/portal")
        assert (await api.get("/portal")).status_code == 401


async def test_the_session_cookie_is_secure_behind_https(settings: Settings) -> None:
    public = "https://tally.example.com"
    async with tally_app(settings, public_url=public) as app, client_of(app) as api:
        account = await sign_up(api)
        minted = (await mint(api, account.customer, expires_in=600)).json()
        assert minted["url"].startswith(f"{public}/portal?token=")
        entered = await api.get("/portal", params={"token": minted["token"]})
    assert entered.status_code == 303 and entered.headers["location"] == "/portal"
    assert entered.headers["cache-control"] == "no-store"
    cookie = entered.headers["set-cookie"]
    for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Path=/portal"):
        assert attribute in cookie, (attribute, cookie)
    assert "Max-Age=" in cookie
    max_age = int(cookie.split("Max-Age=")[1].split(";")[0])
    assert 590 <= max_age <= 600  # the session ends with the token
