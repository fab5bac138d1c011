"""The background sender: batches buffered events and posts them to ``/v1/events``.

Batching trades a little latency (``max_delay``) for far fewer requests: metering must
cost the metered service almost nothing.  One batch is in flight at a time and is retried
until Tally answers with something final, so order is kept and a retry resends exactly
the same events — ingest answers 202 only once Kafka holds them, and Tally drops the
copies of what a lost answer already stored.  While a batch waits, new events wait in
the bounded buffer: backpressure instead of unbounded memory.  Batches are gzipped
(level 1: CloudEvents JSON shrinks several-fold), which ingest accepts with
``Content-Encoding: gzip``.

Encoding a batch is the one piece of work here that grows with the batch (a few ms for
500 events with ``json`` and ``gzip``), and in one go on the event loop it would stall
every request the app is serving at that moment: a p99 spike per batch.  So the JSON is
made on the loop in chunks of ``CHUNK`` events with ``orjson`` (a tenth of ``json``'s
time: ~30 µs a chunk), the loop free between chunks, and only ``gzip`` runs in the
emitter's own thread (not the loop's default executor, which the app may keep busy),
where zlib lets go of the GIL while it compresses.  The JSON was made in that thread
too once, but every chunk then handed the GIL from the loop to the thread and back, and
a hand-over between cores costs the loop more than the chunk itself (~0.15 ms on a VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tally_sdk.answers import BatchAnswer, read_reply
from tally_sdk.backoff import Backoff, retry_after, retryable
from tally_sdk.buffer import Event, EventBuffer, Overflow
from tally_sdk.errors import ClientClosed
from tally_sdk.pipelined import Dropped, Reply
from tally_sdk.reports import Outcome, Reporter, Undelivered

log = logging.getLogger("tally_sdk")
BATCH_MEDIA_TYPE = "application/cloudevents-batch+json"
CHUNK = 200  # events encoded per step of the event loop: about 30 µs with orjson

Post = Callable[[bytes, Mapping[str, str]], Awaitable[Reply]]
"""Sends a batch's body with these headers to ``/v1/events``; raises ``Dropped`` or
``TimeoutError`` when no answer came."""


def _json(events: list[dict[str, Any]]) -> bytes:
    return json.dumps(events, separators=(",", ":")).encode()


def _fast_json() -> Callable[[list[dict[str, Any]]], bytes]:
    """``orjson`` when installed, else ``json``: the same JSON for the events an app
    emits; what orjson refuses (ints beyond 64 bits, non-str keys) goes through json."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency; kept for vendoring
        return _json

    def encode(events: list[dict[str, Any]]) -> bytes:
        try:
            return orjson.dumps(events)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            return _json(events)

    return encode


to_json = _fast_json()


async def batch_json(events: list[dict[str, Any]]) -> bytes:
    """A batch as one JSON array (the request body unless gzipped), made a chunk at a
    time: the event loop serves requests between chunks."""
    chunks = []
    for n in range(0, len(events), CHUNK):
        if n:
            await asyncio.sleep(0)
        chunks.append(to_json(events[n : n + CHUNK])[1:-1])
    return b"[" + b",".join(chunks) + b"]"


def gzipped(body: bytes) -> bytes:
    """``body`` gzipped (level 1), in the emitter's thread: zlib lets go of the GIL."""
    return gzip.compress(body, compresslevel=1, mtime=0)


async def _release(batch: list[Event]) -> None:
    """Free a delivered batch a chunk per turn of the event loop: freeing 2,000 events
    (some 10,000 objects) at once is a step of several hundred µs."""
    while batch:
        del batch[-CHUNK:]
        await asyncio.sleep(0)


class Emitter:
    def __init__(
        self,
        post: Post,
        reporter: Reporter,
        *,
        max_buffer: int,
        overflow: Overflow,
        max_batch: int,
        max_delay: float,
        backoff: Backoff,
        compress: bool = True,
    ) -> None:
        if not 1 <= max_batch <= 10_000:
            raise ValueError("max_batch must be between 1 and 10,000 (ingest's limit)")
        self._post_batch = post
        self._reporter = reporter
        self._stats = reporter.stats
        self._buffer = EventBuffer(max_buffer, overflow, self._dropped)
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._backoff = backoff
        # the counts and the events not accepted, not a line per accepted event
        self._headers = {"Content-Type": BATCH_MEDIA_TYPE, "Prefer": "return=minimal"}
        if compress:
            self._headers["Content-Encoding"] = "gzip"
        self._in_flight: list[Event] = []
        self._in_flight_from = 0  # the number of its first event
        self._wake = asyncio.Event()  # the sender has something to do
        self._progress = asyncio.Event()  # pulsed whenever events stop being pending
        self._flushes = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._encoder: ThreadPoolExecutor | None = None  # started with the first batch

    def put(self, event: Event) -> None:
        """Buffer ``event``, which has every field the wire format needs."""
        if self._closed:
            raise ClientClosed("the Tally client is closed; the event was not buffered")
        if self._task is None:
            self._start()
        waiting = self._buffer.put(event)
        self._stats.emitted += 1
        if waiting == 1 or waiting == self._max_batch:
            self._wake.set()

    async def flush(self) -> None:
        """Wait until every event emitted before this call is delivered or reported."""
        target = self._buffer.next_seq
        self._flushes += 1
        self._wake.set()
        try:
            while self._low_water() < target:
                await self._progress.wait()
        finally:
            self._flushes -= 1

    async def aclose(self, grace: float) -> None:
        """Flush for up to ``grace`` seconds, then report whatever is left as abandoned."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TimeoutError):  # not wait_for: it can lose a cancellation
            async with asyncio.timeout(grace):
                await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._encoder is not None:
            self._encoder.shutdown(wait=False)
        left = self._in_flight + self._buffer.take(len(self._buffer))
        self._in_flight = []
        self._reporter.undelivered([Undelivered(e, Outcome.ABANDONED) for e in left])
        self._pulse()  # a flush still waiting elsewhere: nothing is pending any more

    def _start(self) -> None:
        """The sender task, started by the first ``put`` (when none runs)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tally-emitter")

    def _low_water(self) -> int:
        """The number of the oldest event still pending (the next to come when none is)."""
        return self._in_flight_from if self._in_flight else self._buffer.head

    def _pulse(self) -> None:
        # Waking every current waiter is all a pulse needs: asyncio.Event.set() resolves
        # the waiters' futures, and clear() only affects later waits.
        self._progress.set()
        self._progress.clear()

    def _dropped(self, event: Event) -> None:
        self._reporter.undelivered([Undelivered(event, Outcome.DROPPED)])
        self._pulse()

    async def _run(self) -> None:
        while True:
            await self._gather()
            self._in_flight_from = self._buffer.head
            batch = self._in_flight = self._buffer.take(self._max_batch)
            try:
                await self._deliver(batch)
            except Exception as exc:  # a bug must not stop metering for good
                log.exception("tally: unexpected error while sending events")
                problem = {"detail": repr(exc)}
                self._reporter.undelivered(
                    [Undelivered(e, Outcome.ABANDONED, problem=problem) for e in batch]
                )
            self._in_flight = []
            self._pulse()
            await _release(batch)

    async def _gather(self) -> None:
        """Wait for a batch worth sending: full, ``max_delay`` old, or wanted by a flush."""
        while not len(self._buffer):
            self._wake.clear()
            await self._wake.wait()
        loop = asyncio.get_running_loop()  # its clock is time.monotonic's (to the ms)
        deadline = self._buffer.oldest_at + self._max_delay
        while len(self._buffer) < self._max_batch and not (self._flushes or self._closed):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _deliver(self, events: list[dict[str, Any]]) -> None:
        compress = "Content-Encoding" in self._headers
        if self._encoder is None:
            self._encoder = ThreadPoolExecutor(1, thread_name_prefix="tally-emitter")
        loop = asyncio.get_running_loop()
        body = await batch_json(events)
        if compress:
            body = await loop.run_in_executor(self._encoder, gzipped, body)
        attempt = 0
        while True:
            reply = await self._post(body)
            if reply is not None and not retryable(reply.status):
                answer = await loop.run_in_executor(self._encoder, read_reply, reply)
                self._settle(events, answer)
                return
            wait = self._backoff.delay(attempt, retry_after(reply.headers) if reply else None)
            status = reply.status if reply else "no answer"
            log.info(
                "tally: %d events not stored (%s); retrying in %.2fs", len(events), status, wait
            )
            self._stats.retries += 1
            attempt += 1
            await asyncio.sleep(wait)

    async def _post(self, body: bytes) -> Reply | None:
        self._stats.requests += 1
        try:
            return await self._post_batch(body, self._headers)
        except (Dropped, TimeoutError) as exc:
            log.debug("tally: posting events failed: %r", exc)
            return None

    def _settle(self, events: list[dict[str, Any]], answer: BatchAnswer) -> None:
        """Account for every event of a batch Tally gave a final answer to."""
        stats = self._stats
        if answer.counted:
            stats.accepted += answer.accepted
            stats.duplicates += answer.duplicates
            rejected = Outcome.REJECTED
            self._reporter.undelivered(
                [
                    Undelivered(events[i], rejected, answer.status, errors=e)
                    for i, e in answer.rejected
                ]
            )
        elif 200 <= answer.status < 300:
            stats.accepted += len(events)
        else:
            refused, status, problem = Outcome.REFUSED, answer.status, answer.problem or None
            self._reporter.undelivered(
                [Undelivered(e, refused, status, problem=problem) for e in events]
            )
