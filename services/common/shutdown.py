"""A bound on shutdown: a process asked to stop exits within a stated time.

Stopping in order (uvicorn's in-flight requests, the aggregator's batch in hand, the
drain of the embedded broker, each store's close) is what keeps data whole, and each
step waits for a store. A store that hangs (a blackholed Redis, a broker behind a dead
link) would hold that step for ever, and an orchestrator's SIGKILL would then come
anyway, later and unannounced. So the first SIGTERM/SIGINT arms a bound watched by a
thread of its own — it fires even if the event loop is blocked — that ends the process
at the limit, naming what it cut short. What it cuts is what a kill -9 would: the
aggregator commits its offsets only after its sinks took a batch, so that batch is
replayed, and the sinks are idempotent.

One step may move the bound: the drain of the embedded broker, whose topics live in
memory and die with the process. While it still makes progress, cutting it would lose
accepted events, so each step forward gives it the limit again (``Bound.extend``); a
drain that stalls (its stores hung) is ended like any other step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from services.common.logging import get_logger

log = get_logger("tally")
EXIT_CUT_SHORT = 70  # EX_SOFTWARE: stopped, but not in order
TICK_SECONDS = 0.05
HURRY = signal.SIGUSR1
"""A stop is on its way: the aggregator inserts the raw events it gathered for ClickHouse
at once, and each batch's from then on, so the records they came in are committed
without waiting out ``TALLY_AGGREGATOR_INSERT_SECONDS`` (``tally up`` sends it to back
as its stop begins: front waits for what its write-ahead log holds to be committed)."""


class Bound:
    """Exit ``EXIT_CUT_SHORT`` once ``seconds`` pass with the process still running;
    ``extend`` restarts the count for work that is visibly moving."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadline: float | None = None
        self._lock = threading.Lock()

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def arm(self) -> None:
        """Start the count (once: later calls change nothing)."""
        with self._lock:
            if self._deadline is not None:
                return
            self._deadline = time.monotonic() + self.seconds
        watcher = threading.Thread(target=self._watch, name="shutdown bound", daemon=True)
        watcher.start()

    def extend(self) -> None:
        """The full limit again from now, if the count has started."""
        with self._lock:
            if self._deadline is not None:
                self._deadline = max(self._deadline, time.monotonic() + self.seconds)

    def _watch(self) -> None:
        while True:
            with self._lock:
                left = (self._deadline or 0) - time.monotonic()
            if left <= 0:
                self._cut_short()
            time.sleep(min(left, TICK_SECONDS))

    def _cut_short(self) -> None:
        log.error(
            "shutdown did not finish in time; exiting now",
            limit_seconds=self.seconds,
            waiting_for=[
                t.name for t in threading.enumerate() if t is not threading.current_thread()
            ],
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CUT_SHORT)


def exit_after(seconds: float) -> Bound:
    """Arm a bound of ``seconds`` now (the timer's thread is a daemon: it never holds an
    exit)."""
    bound = Bound(seconds)
    bound.arm()
    return bound
