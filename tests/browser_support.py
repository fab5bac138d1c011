"""A real browser for the dashboards' tests: Debian's Chromium driven by Playwright.

``make test`` installs the ``chromium`` package when it is missing (see the Makefile);
Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from playwright.async_api import Browser, async_playwright

CHROMIUM = os.environ.get("TALLY_TEST_CHROMIUM", "/usr/bin/chromium")


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium, closed on exit. No network beyond what the page asks of
    the test's own server: a page that needs a CDN shows it by failing."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()
