"""The customer dashboard in a real browser (Debian Chromium), served over real HTTP.

A portal link opens the page and leaves the address bar without its token; the quota
bars take their colours at 50, 75 and 95 %; uPlot draws each chart from the page's
embedded JSON; nothing is asked of any other origin and nothing breaks the page's
Content-Security-Policy (a violation is a console error); without JavaScript the
numbers are all there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from playwright.async_api import Browser, ConsoleMessage, Page, Request
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.types import ASGIApp

from schemas.catalog import Meter
from services.common.broker import free_port
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from tests.accounts_support import ADMIN
from tests.browser_support import chromium
from tests.portal_support import client_of, customer_with_usage, dashboard_plan, tally_app

# A canvas with anything drawn on it has some pixel that is not fully transparent.
DRAWN = """canvas => canvas.getContext('2d')
    .getImageData(0, 0, canvas.width, canvas.height).data.some((v, i) => i % 4 === 3 && v > 0)"""


@asynccontextmanager
async def serving(app: ASGIApp, port: int) -> AsyncIterator[str]:
    """``app`` over HTTP on ``port``, in this event loop, for as long as the block runs."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):  # up to 10 s
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def link(base: str, customer: str) -> str:
    async with httpx.AsyncClient() as client:
        reply = await client.post(f"{base}/v1/customers/{customer}/portal-tokens", headers=ADMIN)
    assert reply.status_code == 201, reply.text
    url: str = reply.json()["url"]
    assert url.startswith(base)
    return url


async def watched(browser: Browser, base: str, javascript: bool) -> tuple[Page, list[str]]:
    """A fresh page; what goes wrong on it (console errors, page errors, requests to
    another origin) lands in the list."""
    context = await browser.new_context(java_script_enabled=javascript)
    page = await context.new_page()
    trouble: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            trouble.append(f"console {message.type}: {message.text}")

    def request(sent: Request) -> None:
        if not sent.url.startswith(base + "/"):
            trouble.append(f"request to another origin: {sent.url}")

    page.on("console", console)
    page.on("pageerror", lambda error: trouble.append(f"page error: {error}"))
    page.on("request", request)
    return page, trouble


async def test_the_dashboard_in_a_browser(
    settings: Settings,
    ch: ClickHouse,
    redis: Redis,
    pool: AsyncConnectionPool,
    meters: dict[str, list[Meter]],
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with (
        # billing read over real HTTP (TALLY_BILLING_URL), as when it runs apart
        tally_app(settings, public_url=base, billing_url=base) as app,
        serving(app, port),
        client_of(app) as api,
        chromium() as browser,
    ):
        customer, _ = await customer_with_usage(
            api, settings, ch, redis, pool, meters, dashboard_plan()
        )
        page, trouble = await watched(browser, base, javascript=True)
        await page.goto(await link(base, customer))
        assert page.url == f"{base}/portal"  # the token left the address bar
        assert await page.inner_text("#customer") == customer
        bars = {
            meter: await page.get_attribute(f".quota[data-meter={meter}] .meter", "class")
            for meter in ("api_calls", "compute_seconds", "storage_gb")
        }
        assert bars == {
            "api_calls": "meter",
            "compute_seconds": "meter warn",
            "storage_gb": "meter over",
        }
        widths = [
            await page.eval_on_selector(
                f".quota[data-meter={meter}] .meter > span",
                "span => Math.round(span.getBoundingClientRect().width"
                " / span.parentElement.clientWidth * 100)",
            )
            for meter in ("api_calls", "compute_seconds", "storage_gb")
        ]
        assert widths == [50, 75, 95]
        charts = page.locator(".chart[data-drawn=true] canvas")
        assert await charts.count() == 3  # api_calls, compute_seconds, storage_gb
        for index in range(3):
            assert await charts.nth(index).evaluate(DRAWN)
        assert trouble == []

        still, trouble = await watched(browser, base, javascript=False)
        await still.goto(await link(base, customer))
        assert still.url == f"{base}/portal"
        assert await still.inner_text(".quota[data-meter=api_calls] .used") == "49"
        assert await still.inner_text(".quota[data-meter=compute_seconds] .used") == "750"
        assert (
            await still.locator("section.usage[data-meter=api_calls] table.days tr").count() == 31
        )
        assert await still.locator(".chart canvas").count() == 0
        assert await still.locator("#to-date").count() == 1  # billing answered over HTTP
        assert await still.locator(".unavailable").count() == 0
        assert trouble == []
