"""Ingest as a running service."""

from __future__ import annotations

from schemas import topics
from services.ingest.app import Ingest, openapi_schemas, router
from services.ingest.backpressure import Backpressure
from services.ingest.publisher import Publisher
from services.runtime import Component, Runtime


async def start(runtime: Runtime) -> Component:
    producer = await runtime.producer()

    async def kafka() -> None:
        await producer.partitions_for(topics.EVENTS)

    guard = backpressure(runtime, await runtime.bootstrap_servers())
    ingest = Ingest(runtime.settings, Publisher(producer), await runtime.authenticator(), guard)
    return Component(
        "ingest", routers=[router(ingest)], checks={"kafka": kafka}, schemas=openapi_schemas()
    )


def backpressure(runtime: Runtime, bootstrap: str) -> Backpressure | None:
    """The aggregator's lag, watched in the background (``TALLY_INGEST_MAX_LAG_SECONDS``)."""
    settings = runtime.settings
    if not settings.ingest_max_lag_seconds:
        return None
    guard = Backpressure(bootstrap, settings.consumer_group, settings.ingest_max_lag_seconds)
    runtime.background(guard.run(), "ingest backpressure")
    return guard
