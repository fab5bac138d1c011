"""The two guards that keep processes from outliving what they should: the shutdown
bound, and the embedded broker's tie to its parent."""

from __future__ import annotations

import os
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


def test_a_child_runs_as_much_nicer_as_asked_in_a_process_group_of_its_own() -> None:
    """``tally up`` starts back and the broker nicer than itself, each in a process group
    of its own (a Ctrl-C reaches the parent alone) but in the parent's session: a session
    of its own would be a scheduling group of its own under the kernel's autogroup.  As
    a background group of the terminal's session, it must not be stopped for writing
    its log there."""
    report = (
        "import os, signal; print(os.nice(0), os.getpgid(0) == os.getpid(), os.getsid(0),"
        " signal.getsignal(signal.SIGTTOU) == signal.SIG_IGN)"
    )
    child = subprocess.run(
        [sys.executable, "-c", report],
        preexec_fn=die_with(os.getpid(), 7),
        process_group=0,
        capture_output=True,
        timeout=20,
        check=True,
    )
    nice, leads_its_group, session, writes_to_the_terminal = child.stdout.split()
    assert int(nice) == min(19, os.nice(0) + 7)
    assert leads_its_group == b"True"
    assert int(session) == os.getsid(0)
    assert writes_to_the_terminal == b"True"  # not stopped by SIGTTOU under `stty tostop`
