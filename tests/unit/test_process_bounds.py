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


MOVING = (
    "from services.common.shutdown import Bound\n"
    "import time\n"
    "bound = Bound(0.5)\n"
    "bound.arm()\n"
    "for _ in range(8):  # a drain that keeps moving, for 1.6 s in all\n"
    "    time.sleep(0.2)\n"
    "    bound.extend()\n"
    "print('drained', flush=True)\n"
    "time.sleep(30)  # then a step that never ends\n"
)


def test_work_that_keeps_moving_extends_the_bound_and_a_stall_still_ends_it() -> None:
    """The embedded broker's drain outlives the limit while it makes progress (its
    events would die with the process), and is cut once it stalls."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", MOVING], capture_output=True, timeout=20)
    took = time.monotonic() - started
    assert done.returncode == EXIT_CUT_SHORT
    assert b"drained" in done.stdout, done.stdout + done.stderr
    assert 1.6 < took < 10


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
