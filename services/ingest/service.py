"""Ingest as a running service."""

from __future__ import annotations

from schemas import topics
from services.common.logging import get_logger
from services.common.settings import DEV_TOKEN
from services.ingest.app import Ingest, openapi_schemas, router
from services.ingest.publisher import Publisher
from services.runtime import Component, Runtime

log = get_logger("tally.ingest")


async def start(runtime: Runtime) -> Component:
    producer = await runtime.producer()

    async def kafka() -> None:
        await producer.partitions_for(topics.EVENTS)

    settings = runtime.settings
    if not settings.embedded_kafka and DEV_TOKEN in settings.service_tokens:
        log.warning("the development ingest token is accepted: set TALLY_SERVICE_TOKENS")
    ingest = Ingest(settings, Publisher(producer), await runtime.pool())
    return Component(
        "ingest", routers=[router(ingest)], checks={"kafka": kafka}, schemas=openapi_schemas()
    )
