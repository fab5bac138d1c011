"""The revenue dashboard in a real browser (Debian Chromium) against a real HTTP server:
sign in with the admin token, read MRR, see the chart drawn with nothing fetched from
elsewhere and nothing complained about; a wrong token shows the error; without
JavaScript every number is still there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn
from playwright.async_api import Browser, Page
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from services.common.settings import Settings
from tests.billing_support import change, subscribe
from tests.browser_support import chromium
from tests.conftest import REDIS_URL
from tests.revenue_support import own_database, revenue_app

TOKEN = "dev-admin-token"


@pytest.fixture
async def served() -> AsyncIterator[str]:
    """The billing service's revenue routes and pages under uvicorn, on a free port, over
    a database whose MRR is 248.00: a pro (199) and a starter (49) customer."""
    async with own_database() as url, AsyncConnectionPool(url, open=False) as pool:
        now = datetime.now(UTC)
        await subscribe(pool, "web-pro", "pro", now - timedelta(days=70), "trial")
        await change(pool, "web-pro", now - timedelta(days=56), status="active")
        await subscribe(pool, "web-starter", "starter", now - timedelta(days=40))
        await subscribe(pool, "web-gone", "starter", now - timedelta(days=100))
        await change(pool, "web-gone", now - timedelta(days=20), status="cancelled")
        redis = Redis.from_url(REDIS_URL)
        app = revenue_app(Settings(database_url=url, redis_url=REDIS_URL), pool, redis)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag, no event)
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task
            await redis.aclose()


def watch(page: Page, base: str) -> tuple[list[str], list[str]]:
    """Console errors (CSP violations among them) and requests to anywhere else."""
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith(base) else elsewhere.append(r.url))
    return errors, elsewhere


async def sign_in(browser: Browser, base: str, token: str, javascript: bool = True) -> Page:
    context = await browser.new_context(java_script_enabled=javascript)
    page = await context.new_page()
    await page.goto(f"{base}/admin")
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")
    return page


async def test_sign_in_see_mrr_and_the_chart_drawn(served: str) -> None:
    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        errors, elsewhere = watch(page, served)
        await page.goto(f"{served}/admin")
        await page.fill("input[name=token]", "not-the-token")
        await page.click("button[type=submit]")
        assert await page.text_content("#login-error") == "Wrong admin token."
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{served}/admin/revenue")
        assert await page.text_content("#mrr-usd") == "248.00"
        assert await page.text_content("#arpu-usd") == "124.00"
        await page.wait_for_selector("#chart-usd[data-drawn=true] canvas")
        painted = await page.evaluate(
            """() => {
                const canvas = document.querySelector('#chart-usd canvas');
                const pixels = canvas.getContext('2d')
                    .getImageData(0, 0, canvas.width, canvas.height).data;
                let inked = 0;
                for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) inked++;
                return [canvas.width, inked];
            }"""
        )
        assert painted[0] >= 320 and painted[1] > 500, painted
        legend = await page.text_content("#chart-usd")
        assert legend is not None and "Ending MRR" in legend
        # The only console error is the browser's report of the wrong token's 401.
        assert [e for e in errors if "401" not in e] == [], errors
        assert elsewhere == []


async def test_without_javascript_the_numbers_are_there(served: str) -> None:
    async with chromium() as browser:
        page = await sign_in(browser, served, TOKEN, javascript=False)
        await page.wait_for_url(f"{served}/admin/revenue")
        assert await page.text_content("#mrr-usd") == "248.00"
        assert await page.locator("#chart-usd canvas").count() == 0
        cells = await page.locator("#movements-usd tbody tr").last.locator("td").all_inner_texts()
        assert cells[-1] == "248.00"  # this month's ending MRR, in the table
        churned = await page.locator("#movements-usd").inner_text()
        assert "49.00" in churned
