"""Ingest as a running service."""

from __future__ import annotations

from schemas import topics
from services.ingest.app import Ingest, openapi_schemas, router
from services.ingest.publisher import Publisher
from services.runtime import Component, Runtime


async def start(runtime: Runtime) -> Component:
    producer = await runtime.producer()

    async def kafka() -> None:
        await producer.partitions_for(topics.EVENTS)

    ingest = Ingest(runtime.settings, Publisher(producer), await runtime.authenticator())
    return Component(
        "ingest", routers=[router(ingest)], checks={"kafka": kafka}, schemas=openapi_schemas()
    )
