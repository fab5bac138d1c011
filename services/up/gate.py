"""The gate ``tally up``'s children wait at: they import while the supervisor prepares.

A child spends about two seconds importing its services, the supervisor up to as long
migrating PostgreSQL and seeding the catalog.  One after the other, a start paid both;
so the supervisor starts its children first, and each imports, then waits here — before
it opens any store — until the supervisor writes to a pipe that the preparation is
done: no service touches PostgreSQL before the migrations have run.  End of file instead
of the byte means the supervisor gave up: the child exits without starting.
"""

from __future__ import annotations

import contextlib
import os

GATE_FD = "TALLY_UP_GATE_FD"
OPEN = b"1"


class Closed(SystemExit):
    """The supervisor closed the gate without opening it (it is stopping)."""

    def __init__(self) -> None:
        super().__init__(1)


def wait() -> None:
    """In a child: block until the supervisor opens the gate (no gate: go on at once)."""
    fd = os.environ.pop(GATE_FD, None)
    if fd is None:
        return
    with os.fdopen(int(fd), "rb") as pipe:
        if pipe.read(1) != OPEN:
            raise Closed


class Gate:
    """The supervisor's end of one child's gate."""

    def __init__(self) -> None:
        self.read, self._write = os.pipe()

    def env(self) -> dict[str, str]:
        return {GATE_FD: str(self.read)}

    def spawned(self) -> None:
        """The child holds its end now; the supervisor's copy is closed."""
        os.close(self.read)

    def open(self) -> None:
        """Let the child through; a child that has already exited is no matter."""
        if self._write >= 0:
            with contextlib.suppress(BrokenPipeError):
                os.write(self._write, OPEN)
        self.close()

    def close(self) -> None:
        """Idempotent: a closed descriptor's number may already be another file's."""
        if self._write >= 0:
            os.close(self._write)
            self._write = -1
