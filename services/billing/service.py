"""Billing as a running service: the scheduled incremental rollup."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from services.billing.rollup import Rollup
from services.common.logging import get_logger
from services.runtime import Component, Runtime

log = get_logger("tally.billing")


async def rollup(runtime: Runtime) -> Rollup:
    settings = runtime.settings
    return Rollup(
        runtime.clickhouse(),
        await runtime.pool(),
        timedelta(seconds=settings.rollup_safety_lag_seconds),
    )


async def start(runtime: Runtime) -> Component:
    job = await rollup(runtime)
    runtime.background(_every(job, runtime.settings.rollup_interval_seconds), "rollup")
    return Component(
        "billing",
        checks={"clickhouse": runtime.check_clickhouse(), "postgres": runtime.check_postgres()},
    )


async def _every(job: Rollup, seconds: float) -> None:
    while True:
        try:
            report = await job.run_incremental()
            if report.cells:
                log.info("rollup", cells=report.cells, rows=report.rows, watermark=report.watermark)
        except Exception as exc:  # the next pass picks up where this one failed
            log.error("rollup failed", error=repr(exc))
        await asyncio.sleep(seconds)
