"""``/healthz`` (the process is up), ``/readyz`` (its dependencies answer) and ``/metrics``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.common.metrics import metrics_endpoint

Check = Callable[[], Awaitable[object]]


class Health(BaseModel):
    status: str = Field(description="`ok`: the process is up.")


class Readiness(BaseModel):
    status: str = Field(description="`ready`, or `not ready` (with 503)")
    checks: dict[str, str] = Field(description="Each dependency: `ok`, or `failed: …`")


def health_router(checks: Mapping[str, Check], timeout: float = 2.0) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A dependency failed"}},
    )
    async def readyz() -> JSONResponse:
        results = await asyncio.gather(
            *(asyncio.wait_for(check(), timeout) for check in checks.values()),
            return_exceptions=True,
        )
        report = {
            name: "ok" if not isinstance(result, BaseException) else f"failed: {result!r}"
            for name, result in zip(checks, results, strict=True)
        }
        ready = all(status == "ok" for status in report.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": report},
            status_code=200 if ready else 503,
        )

    router.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    return router
