"""Validating a big batch leaves the event loop to others between steps: a lease renewal
or a decision on the same loop must not wait for thousands of events."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from services.ingest import parsing
from services.ingest.parsing import JUDGE_STEP, Status, TimeBounds
from tests.support import sample_event

BOUNDS = TimeBounds(future_tolerance=timedelta(minutes=5), backfill_window=timedelta(days=35))


async def test_other_tasks_run_while_a_big_batch_is_judged() -> None:
    now = datetime.now(UTC)
    batch = [sample_event(id=f"e-{n}", time=now.isoformat()) for n in range(3 * JUDGE_STEP)]
    batch.append(dict(batch[0]))  # a repeat within the request, across steps
    ran_at: list[int] = []
    judging = asyncio.ensure_future(parsing.judge(batch, BOUNDS, now))

    async def other() -> None:
        while not judging.done():
            ran_at.append(len(ran_at))
            await asyncio.sleep(0)

    await asyncio.gather(judging, other())
    verdicts = judging.result()
    assert len(ran_at) >= 3  # the other task ran between the steps, not only after
    assert [v.status for v in verdicts].count(Status.ACCEPTED) == 3 * JUDGE_STEP
    assert verdicts[-1].status is Status.DUPLICATE
