"""Geocoder: a small API sold to other companies, metered and limited by Tally.

Its own code knows nothing of plans, keys or limits: ``TallyMiddleware`` turns each
caller's API key into a decision before a route runs and emits one ``api_call`` event
per request served.  Run it with ``uvicorn --factory examples.geocoder.app:create_app``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from tally_sdk import Tally, TallyMiddleware

PLACES = {
    "berlin": (52.52, 13.405),
    "lisbon": (38.7223, -9.1393),
    "nairobi": (-1.2921, 36.8219),
    "paris": (48.8566, 2.3522),
    "tokyo": (35.6762, 139.6503),
}
LABELS = ("building", "bridge", "river", "street", "tree", "vehicle")


class Place(BaseModel):
    query: str
    lat: float
    lon: float


class Image(BaseModel):
    url: str


class Recognition(BaseModel):
    url: str
    labels: list[str]


def tally_from_env() -> Tally:
    return Tally(
        os.environ.get("TALLY_URL", "http://127.0.0.1:8000"),
        os.environ.get("TALLY_SERVICE_TOKEN", "dev-service-token"),
        source="geocoder",
    )


def create_app(tally: Tally | None = None, *, fail_open: bool = False) -> FastAPI:
    """The app; ``fail_open`` serves callers unmetered while Tally is unreachable."""
    client = tally or tally_from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()  # sends the usage events still buffered

    app = FastAPI(title="Geocoder", lifespan=lifespan)
    app.add_middleware(TallyMiddleware, tally=client, fail_open=fail_open)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/geocode")
    async def geocode(q: str) -> Place:
        found = PLACES.get(q.strip().lower())
        if found is None:
            raise HTTPException(404, f"no place called {q!r}")
        return Place(query=q, lat=found[0], lon=found[1])

    @app.post("/v1/recognize")
    async def recognize(image: Image) -> Recognition:
        """The expensive endpoint: plans can price or limit it apart, by its path."""
        await asyncio.sleep(0.05)  # stands in for a model
        digest = hashlib.sha256(image.url.encode()).digest()
        return Recognition(url=image.url, labels=[LABELS[b % len(LABELS)] for b in digest[:3]])

    return app
