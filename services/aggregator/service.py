"""The aggregator as a running service: the Faust app plus the process's meter cache."""

from __future__ import annotations

import asyncio
from functools import partial

from services.aggregator import worker
from services.aggregator.alerts import AlertPublisher
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.processor import BatchProcessor
from services.aggregator.redis_sink import RedisSink
from services.common import clickhouse, shutdown, topic_ids
from services.common.logging import get_logger
from services.runtime import Component, Runtime

log = get_logger("tally.aggregator")


async def start(runtime: Runtime) -> Component:
    settings = runtime.settings
    bootstrap = await runtime.bootstrap_servers()
    await asyncio.to_thread(clickhouse.create_schema, runtime.clickhouse())
    meters = await runtime.meters()
    await meters.meters()  # no aggregating without them: PostgreSQL's error stops start-up
    app = worker.create_app(settings, bootstrap)
    alerts = AlertPublisher(runtime.redis(), meters.by_type)
    await alerts.sweep()
    zones = await runtime.zones()
    await zones.refresh()  # loaded before the first batch (raises like the sweep above)
    processor = BatchProcessor(
        clickhouse=ClickHouseSink(runtime.clickhouse()),
        redis=RedisSink(runtime.redis()),
        meters=meters.by_type,
        dedupe=DedupeWindow(settings.dedupe_window),
        dead_letter=worker.dead_letter_sender(app),
        incarnation=runtime.kafka_incarnation,
        topic_ids=partial(topic_ids.topic_ids, bootstrap),
        alerting=alerts.wake,
        catalog=meters,
        zone_of=zones.zone,
        insert_rows=settings.aggregator_insert_rows,
        insert_seconds=settings.aggregator_insert_seconds,
    )
    runtime.background(alerts.run(), "alert publisher")
    runtime.background(processor.keep_inserting(), "ClickHouse inserts")
    asyncio.get_running_loop().add_signal_handler(shutdown.HURRY, processor.hurry)
    worker.attach(app, settings, processor)
    await app.start()

    async def stop() -> None:
        if settings.in_memory_broker:
            try:
                async with asyncio.timeout(settings.aggregator_drain_seconds):
                    await worker.drain(processor, bootstrap, runtime.shutdown.extend)
            except TimeoutError:
                log.warning("stopping with accepted events not yet aggregated")
        try:  # the rows gathered so far: their records are committed as the app stops
            await processor.flush()
        except Exception as exc:  # their records are not acknowledged: read again next time
            log.warning("rows left for the next start", error=repr(exc))
        await app.stop()
        try:  # what the last batches crossed, before the publisher stops
            await alerts.flush()
        except Exception as exc:  # they wait in Redis for the next start's sweep
            log.warning("alerts left for the next start", error=repr(exc))

    runtime.stack.push_async_callback(stop)
    return Component(
        "aggregator",
        checks={
            "redis": runtime.check_redis(),
            "clickhouse": runtime.check_clickhouse(),
            "postgres": runtime.check_postgres(),
        },
    )
