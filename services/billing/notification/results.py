"""Recording what delivery attempts came to, every attempt waiting in one transaction.

Each attempt is logged in ``delivery_attempts`` and its delivery row updated (succeeded,
pending for a retry, or failed) before the sender frees its slot.  One transaction per
attempt was four round trips and most of the sender's own time at a thousand webhooks a
second; here the first result starts a write, the results that arrive while it runs go
in the next one together (group commit: no timer, so one result alone waits for
nothing).  ``record`` returns once its result is committed, and raises when that write
failed: the row is still leased, and is sent again when the lease runs out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from psycopg_pool import AsyncConnectionPool

from services.billing.notification import endpoints
from services.billing.notification.channel import Attempt

_ATTEMPT = """
    INSERT INTO delivery_attempts (delivery_id, status, response, error, duration_ms)
    VALUES (%s, %s, %s, %s, %s)
"""

_DELIVERY = """
    UPDATE notification_deliveries SET state = %(state)s,
        attempts = attempts + 1, last_attempt_at = now(), last_status = %(status)s,
        last_response = %(response)s, last_error = %(error)s, leased_until = NULL,
        next_attempt_at = CASE WHEN %(retry)s::interval IS NULL THEN next_attempt_at
                               ELSE now() + %(retry)s::interval END,
        succeeded_at = CASE WHEN %(ok)s THEN now() END
    WHERE id = %(id)s
"""


@dataclass(frozen=True, slots=True)
class Result:
    """One attempt and what the sender decided from it."""

    delivery: int
    attempt: Attempt
    state: str  # succeeded, pending (retry) or failed
    retry: timedelta | None  # from now until the next attempt, when there is one
    endpoint_id: str | None  # disabled in the same transaction when it answered 410


class Recorder:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._waiting: list[tuple[Result, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, result: Result) -> None:
        """Write ``result`` with whatever else is waiting; returns once it is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((result, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting(), name="delivery results")
        await done

    async def close(self) -> None:
        """Stop writing; the results not yet committed stay leased (sent again later)."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        for _, done in self._waiting:
            done.cancel()
        self._waiting = []

    async def _write_waiting(self) -> None:
        while self._waiting:
            taken, self._waiting = self._waiting, []
            try:
                await self._write([result for result, _ in taken])
            except Exception as exc:
                for _, done in taken:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in taken:
                    if not done.done():
                        done.set_result(None)

    async def _write(self, results: list[Result]) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            async with conn.cursor() as cur:  # executemany: pipelined, one round trip
                await cur.executemany(_ATTEMPT, [_attempt_row(r) for r in results])
                await cur.executemany(_DELIVERY, [_delivery_row(r) for r in results])
            for r in results:
                if r.attempt.gone and r.endpoint_id is not None:
                    await endpoints.disable(conn, r.endpoint_id, "the endpoint answered 410 Gone")


def _attempt_row(r: Result) -> tuple[object, ...]:
    a = r.attempt
    return (r.delivery, a.status, a.response, a.error, a.duration_ms)


def _delivery_row(r: Result) -> dict[str, object]:
    a = r.attempt
    return {
        "state": r.state,
        "status": a.status,
        "response": a.response,
        "error": a.error,
        "retry": r.retry,
        "ok": a.ok,
        "id": r.delivery,
    }
