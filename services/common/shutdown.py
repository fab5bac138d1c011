"""A bound on shutdown: a process asked to stop exits within a stated time.

Stopping in order (uvicorn's in-flight requests, the aggregator's batch in hand, the
drain of the embedded broker, each store's close) is what keeps data whole, and each
step waits for a store. A store that hangs (a blackholed Redis, a broker behind a dead
link) would hold that step for ever, and an orchestrator's SIGKILL would then come
anyway, later and unannounced. So the first SIGTERM/SIGINT arms a timer on a thread of
its own — it fires even if the event loop is blocked — that ends the process at the
limit, naming what it cut short. What it cuts is what a kill -9 would: the aggregator
commits its offsets only after its sinks took a batch, so that batch is replayed, and
the sinks are idempotent.
"""

from __future__ import annotations

import os
import sys
import threading

from services.common.logging import get_logger

log = get_logger("tally")
EXIT_CUT_SHORT = 70  # EX_SOFTWARE: stopped, but not in order


def exit_after(seconds: float) -> threading.Timer:
    """Arm the bound: the process exits ``EXIT_CUT_SHORT`` at ``seconds`` unless it has
    ended by then (the timer's thread is a daemon: it never holds an exit)."""

    def cut_short() -> None:
        log.error(
            "shutdown did not finish in time; exiting now",
            limit_seconds=seconds,
            waiting_for=[t.name for t in threading.enumerate() if t is not timer],
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CUT_SHORT)

    timer = threading.Timer(seconds, cut_short)
    timer.name = "shutdown bound"
    timer.daemon = True
    timer.start()
    return timer
