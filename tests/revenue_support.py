"""A database of the revenue tests' own (the shared one holds every other test's
customers and invoices, so its MRR is nobody's hand computation), the billing service's
revenue routes and pages over HTTP, and a reader for the page's tables."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import psycopg
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


class PageReader(HTMLParser):
    """Each table's rows of cell texts (by the table's id), and each element's text by id."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.texts: dict[str, str] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of elements with an id
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self._table = found.get("id")
            if self._table:
                self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        if found.get("id") and tag != "table":
            self._open.append((tag, found["id"]))
            self.texts[found["id"] or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, element in self._open:
            self.texts[element or ""] += data

    def text(self, element: str) -> str:
        return " ".join(self.texts[element].split())


def rows(reader: PageReader, table: str) -> list[list[str]]:
    """The table's body rows (its header row left out)."""
    return reader.tables[table][1:]


def plain(number: str) -> str:
    """A figure as the page shows it, as the JSON has it (no thousands separators)."""
    return number.replace(",", "")
