"""CPU affinity for the edge benchmark: the app under test on a core of its own.

On a machine of few cores, an app measured flat out competes with the load generator,
Tally and Redis for the same cores, so its figure says as much about them as about the
app.  A seller runs Tally elsewhere; what the middleware costs *their API* shows when
the app under test has a core to itself and everything else (the load generator, the
benchmark's driver, ``tally up`` and its children, Redis, the idle apps) shares the
rest, the load generator at a higher priority than Tally (see ``Layout.describe``).
Affinity is set on every thread of a process (``sched_setaffinity`` on a pid
moves only its main thread), and the original affinities are put back at the end:
Redis is the machine's, not the benchmark's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Layout:
    """Which cores the app under test runs on, and which everything else does."""

    name: str
    app: frozenset[int]
    rest: frozenset[int]
    load_nice: int = 0
    """The load generator's (and this driver's) nice value."""

    def describe(self) -> str:
        if self.app == self.rest:
            return f"{self.name}: every process on cores {sorted(self.app)}, same priority"
        return (
            f"{self.name}: the app under test alone on cores {sorted(self.app)}; the load "
            f"generator, the driver, tally up and its children, Redis and the idle apps on "
            f"cores {sorted(self.rest)}, the load generator and the driver at nice "
            f"{self.load_nice} (clients on other machines: Tally's bursts of work on the "
            "shared core must not delay the requests they send or time)"
        )


def layouts() -> list[Layout]:
    """``pinned`` (the last core for the app, when there are two or more) and ``shared``."""
    cores = frozenset(os.sched_getaffinity(0))
    shared = Layout("shared", cores, cores)
    if len(cores) < 2:
        return [shared]
    last = max(cores)
    return [Layout("pinned", frozenset({last}), cores - {last}, LOAD_NICE), shared]


LOAD_NICE = -10


def _threads(process: psutil.Process) -> list[int]:
    try:
        return [t.id for t in process.threads()]
    except psutil.NoSuchProcess:
        return []


def _family(process: psutil.Process) -> list[int]:
    """The threads of ``process`` and of its children."""
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [tid for member in members for tid in _threads(member)]


def pin(process: psutil.Process, cores: Iterable[int]) -> None:
    """Every thread of ``process`` (and of its children) onto ``cores``."""
    for tid in _family(process):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, set(cores))


class Pinning:
    """Puts each process where a layout says, and back where it was at the end."""

    def __init__(self, apps: dict[str, psutil.Process], others: list[psutil.Process]) -> None:
        self.apps, self.others = apps, others
        self.saved: dict[int, set[int]] = {}
        for process in [*apps.values(), *others]:  # all that ``pin`` moves
            for tid in _family(process):
                with contextlib.suppress(ProcessLookupError):
                    self.saved[tid] = os.sched_getaffinity(tid)

    def apply(self, layout: Layout, under_test: str) -> None:
        """The others first, the apps last: pinning a process pins its children, and the
        apps are children of this driver, one of the others (pinned after them, the app
        under test would share the others' cores and leave its own idle)."""
        for process in self.others:
            pin(process, layout.rest)
        for kind, process in self.apps.items():
            pin(process, layout.app if kind == under_test else layout.rest)
        for tid in _threads(psutil.Process()):  # this driver, and the wrk it starts
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, tid, layout.load_nice)

    def restore(self) -> None:
        for tid, cores in self.saved.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(tid, cores)
        for tid in _threads(psutil.Process()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, tid, 0)


@contextlib.contextmanager
def pinning(apps: dict[str, psutil.Process], others: list[psutil.Process]) -> Iterator[Pinning]:
    placed = Pinning(apps, others)
    try:
        yield placed
    finally:
        placed.restore()
