"""The two guards that keep processes from outliving what they should: the shutdown
bound, and the embedded broker's tie to its parent."""

from __future__ import annotations

import subprocess
import sys
import time

from services.common.broker import die_with
from services.common.shutdown import EXIT_CUT_SHORT

HANGS = (
    "from services.common.shutdown import exit_after\n"
    "import time\n"
    "exit_after(0.3)\n"
    "time.sleep(30)  # a shutdown step that never ends\n"
)


def test_a_shutdown_that_hangs_is_ended_at_the_bound_and_says_so() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HANGS], capture_output=True, timeout=20)
    assert done.returncode == EXIT_CUT_SHORT
    assert time.monotonic() - started < 10
    assert b"shutdown did not finish in time" in done.stdout + done.stderr


def test_a_child_whose_parent_is_already_gone_does_not_start() -> None:
    """``die_with`` compares the parent it was armed for with the child's real one: a
    mismatch (the parent died before prctl) means an orphan, which exits at once."""
    child = subprocess.run(
        [sys.executable, "-c", "print('started')"],
        preexec_fn=die_with(-1),
        capture_output=True,
        timeout=20,
    )
    assert child.returncode == 1 and child.stdout == b""
