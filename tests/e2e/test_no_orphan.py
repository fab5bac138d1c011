"""kill -9 ``tally up``: its embedded broker (Tansu) dies with it, and a start after the
crash comes up with a broker of its own (issue 15: "no process is ever orphaned")."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from services.common.settings import Settings
from tests.conftest import env_for
from tests.support import TallyProcess

pytestmark = pytest.mark.slow


def brokers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "tansu"]


def test_the_broker_dies_with_tally_up_killed_by_sigkill(
    settings: Settings, tmp_path: Path
) -> None:
    env = env_for(settings)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # `tally up` starts its own embedded broker
    for run in range(2):  # the second start is the start after a crash
        up = TallyProcess(["up"], env, tmp_path / f"up-{run}.log").start()
        assert up.process is not None
        (tansu,) = brokers_of(up.process.pid)
        port = next(c.laddr.port for c in tansu.net_connections() if c.status == "LISTEN")
        killed = time.monotonic()
        up.kill()
        _, alive = psutil.wait_procs([tansu], timeout=2)
        took = time.monotonic() - killed
        assert not alive, f"run {run}: broker {tansu.pid} outlived kill -9 of tally up"
        assert took < 2
        listening = [c for c in psutil.net_connections("tcp") if c.laddr.port == port]
        assert not [c for c in listening if c.status == "LISTEN"], f"port {port} still held"
