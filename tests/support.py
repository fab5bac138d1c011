"""Helpers for tests that run Tally for real: subprocesses, polling, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from services.common.broker import free_port
from services.common.settings import DEV_ADMIN_TOKEN

TALLY = [sys.executable, "-m", "services.cli"]


class TallyProcess:
    """A ``tally`` subcommand in its own process, on a free port, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.args = [*args, "--port", str(self.port)]
        self.env = os.environ | env | {"TALLY_HOST": "127.0.0.1"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 90, every: float = 0.25) -> TallyProcess:
        """Launch it and wait until ``/readyz`` answers 200, asking every ``every`` s."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*TALLY, *self.args], env=self.env, stdout=out, stderr=out, cwd=Path.cwd()
            )
        wait_for(self._ready, ready_timeout, f"{self.args[0]} ready", self.tail, every)
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"tally {self.args[0]} exited:\n{self.tail()}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """kill -9: no flush, no commit, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"tally did not stop on {sig}:\n{self.tail()}") from None
        return self.process.returncode

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    explain: Callable[[], str] = lambda: "",
    every: float = 0.25,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{explain()}")


def clear_of_midnight(now: datetime, span: timedelta) -> datetime:
    """``now``, or the last second of the day before when the ``span`` up to ``now``
    would cross midnight UTC: a test that stamps events up to ``span`` before it and reads
    one day's counters must not find them split over two days when run just after
    midnight."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now if now - day >= span else day - timedelta(seconds=1)


def sample_event(**overrides: Any) -> dict[str, Any]:
    """A valid CloudEvents usage event, as an emitter would send it."""
    raw: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "gateway-eu",
        "type": "api_call",
        "subject": "cust_42",
        "time": "2026-11-03T10:15:30Z",
        "data": {"value": 1, "endpoint": "/v1/x"},
    }
    raw.update(overrides)
    return raw


@contextmanager
def blackhole() -> Iterator[int]:
    """A local TCP port that takes connections and never answers: a store that hangs
    (a dead host behind a live load balancer, a frozen server) rather than refuses."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield listener.getsockname()[1]


def new_customer(client: httpx.Client) -> tuple[str, str]:
    """A customer and its key, made by the admin API of a Tally run with the development
    admin token (a customer Tally has no account for has no invoices to list: 404)."""
    reply = client.post(
        "/v1/admin/customers",
        json={"email": f"{uuid.uuid4().hex[:12]}@example.com"},
        headers={"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"},
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    return body["customer"]["id"], body["api_key"]["key"]
