"""The OpenAPI document `tally up` serves at /openapi.json (and /docs) is whole."""

from __future__ import annotations

import re

import httpx
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from services.api import service as api_service
from services.common.auth import Authenticator
from services.common.settings import Settings
from services.ingest.app import Ingest, openapi_schemas
from services.ingest.app import router as ingest_router
from services.ingest.publisher import Publisher
from services.runtime import Component, Runtime, http_app


async def test_every_reference_resolves_and_docs_render(
    redis: Redis, pool: AsyncConnectionPool, settings: Settings
) -> None:
    ingest = Ingest(settings, Publisher(producer=None), Authenticator(settings, redis, pool))
    async with Runtime(settings) as runtime:
        app = http_app(
            [
                Component("ingest", [ingest_router(ingest)], schemas=openapi_schemas()),
                await api_service.start(runtime),
            ]
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            spec = (await c.get("/openapi.json")).json()
            docs = await c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {
        "/v1/events",
        "/v1/meters",
        "/v1/customers/{customer}/usage",
        "/v1/enforce",
        "/v1/enforce/batch",
        "/v1/signup",
        "/v1/plans",
        "/v1/admin/plans/{plan_id}",
        "/readyz",
    } <= set(spec["paths"])
    referenced = set(re.findall(r"#/components/schemas/([\w-]+)", str(spec)))
    assert referenced <= set(spec["components"]["schemas"])
    assert "UsageEvent" in referenced
