"""kill -9 ``tally up``: its embedded broker (Tansu) and its front and back processes die
with it, and a start after the crash comes up with a broker of its own (issue 15: "no
process is ever orphaned")."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import psutil
import pytest

from services.common.settings import Settings
from tests.conftest import env_for
from tests.support import TallyProcess, wait_for

pytestmark = pytest.mark.slow


def brokers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "tansu"]


def dead(process: psutil.Process) -> bool:
    """Ended: gone, or a zombie its new parent (init, here) has not reaped yet."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_the_broker_dies_with_tally_up_killed_by_sigkill(
    settings: Settings, tmp_path: Path
) -> None:
    env = env_for(settings)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # `tally up` starts its own embedded broker
    # (the start after a crash, and its broker: tests/e2e/test_durable_up.py)
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    assert up.process is not None
    (tansu,) = brokers_of(up.process.pid)
    port = next(c.laddr.port for c in tansu.net_connections() if c.status == "LISTEN")
    # the supervisor's processes: the broker, front (ingest + api), back (aggregator…)
    children = psutil.Process(up.process.pid).children(recursive=True)
    assert len(children) == 3, children
    killed = time.monotonic()
    up.kill()  # returns once tally up is reaped
    reaped = time.monotonic()
    for child in children:
        wait_for(partial(dead, child), 3, f"{child.pid} to die")
    gone = time.monotonic()
    print(
        f"tally up reaped {reaped - killed:.2f}s after kill -9,"
        f" its broker and processes gone {gone - reaped:.2f}s later"
    )
    listening = [c for c in psutil.net_connections("tcp") if c.laddr.port == port]
    assert not [c for c in listening if c.status == "LISTEN"], f"port {port} still held"
