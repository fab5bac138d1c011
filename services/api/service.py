"""The query API as a running service."""

from __future__ import annotations

from services.api.app import router
from services.runtime import Component, Runtime


async def start(runtime: Runtime) -> Component:
    return Component(
        "api",
        routers=[router(runtime.redis(), await runtime.pool())],
        checks={"redis": runtime.check_redis(), "postgres": runtime.check_postgres()},
    )
