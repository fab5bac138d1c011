"""A database of the revenue tests' own (the shared one holds every other test's
customers and invoices, so its MRR is nobody's hand computation), the billing service's
revenue routes and pages over HTTP, and the page's figures and tables as text."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httpx
import psycopg
from bs4 import BeautifulSoup
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.types import ASGIApp

from schemas.catalog import Catalog
from services.api.catalog import store as catalog_store
from services.billing.revenue import pages, routes
from services.common import postgres
from services.common.auth import Authenticator
from services.common.settings import Settings
from services.runtime import Component, http_app
from tests.accounts_support import random_address
from tests.conftest import ADMIN_URL

ADMIN = {"Authorization": "Bearer dev-admin-token"}


@asynccontextmanager
async def own_database() -> AsyncIterator[str]:
    """A fresh, migrated database with the default catalog, dropped on exit."""
    name = f"tally_revenue_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlsplit(ADMIN_URL)._replace(path=f"/{name}").geturl()
    try:
        postgres.migrate(url)
        async with AsyncConnectionPool(url, open=False) as pool:
            await catalog_store.load(pool, Catalog.default())
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def revenue_app(settings: Settings, pool: AsyncConnectionPool, redis: Redis) -> ASGIApp:
    auth = Authenticator(settings, redis, pool)
    return http_app(
        [
            Component(
                "billing",
                routers=[
                    routes.router(pool, redis, auth),
                    pages.router(settings, pool, redis, auth),
                ],
            )
        ]
    )


@asynccontextmanager
async def revenue_client(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis
) -> AsyncIterator[httpx.AsyncClient]:
    app = revenue_app(settings, pool, redis)
    transport = httpx.ASGITransport(app, client=(random_address(), 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


def text(page: BeautifulSoup, element: str) -> str:
    """The text of the element with this id, whitespace folded."""
    found = page.find(id=element)
    assert found is not None, element
    return " ".join(found.get_text(" ").split())


def rows(page: BeautifulSoup, table: str) -> list[list[str]]:
    """The cell texts of the table's body rows."""
    found = page.find("table", id=table)
    assert found is not None, table
    return [
        [" ".join(cell.get_text(" ").split()) for cell in row.find_all("td")]
        for row in found.select("tbody tr")
    ]


def plain(number: str) -> str:
    """A figure as the page shows it, as the JSON has it (no thousands separators)."""
    return number.replace(",", "")
