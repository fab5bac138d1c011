"""Flat-out load from ``wrk`` (a C load generator): requests/s and latency.

The Python load generator (``bench.http_load``) spends tens of µs of CPU per request,
a large share of what the app it drives spends, on the same cores; ``wrk`` spends a few
(the caller reads its CPU from the children's rusage, so a run shows whether the
generator was the bottleneck).  ``bench/wrk_requests.lua`` rotates one header's values
(customers' keys) and prints a JSON summary.  Debian's ``wrk`` (``make bench`` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson

SCRIPT = Path(__file__).with_name("wrk_requests.lua")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    status_errors: int
    socket_errors: int
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "per_second": round(self.per_second),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": {"status_4xx_5xx": self.status_errors, "socket": self.socket_errors},
        }


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed: `apt-get install -y wrk` (or `make bench`)")
    return found


def closed_loop(
    url: str,
    path: str,
    body: bytes,
    keys: list[str],
    connections: int,
    seconds: float,
    method: str = "POST",
    header: str = "X-API-Key",
) -> WrkResult:
    """``connections`` keep-alive connections, one ``wrk`` thread, for ``seconds``
    (whole seconds: wrk takes no fraction); request after request, ``header`` takes the
    next of ``keys`` (an empty ``body`` sends none)."""
    with tempfile.NamedTemporaryFile("w", suffix=".keys") as listed:
        listed.write("\n".join(keys) + "\n")
        listed.flush()
        whole = max(1, round(seconds))
        command = [wrk_path(), "-t1", f"-c{connections}", f"-d{whole}s", "-s", str(SCRIPT)]
        command += [url, "--", listed.name, path, body.decode(), method, header]
        done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode or not done.stdout.strip():
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.decode()}")
    report = orjson.loads(done.stdout.decode().strip().splitlines()[-1])
    return WrkResult(
        requests=report["requests"],
        seconds=report["duration_us"] / 1e6,
        status_errors=report["status_errors"],
        socket_errors=report["socket_errors"],
        p50_ms=round(report["p50_us"] / 1000, 2),
        p99_ms=round(report["p99_us"] / 1000, 2),
    )
