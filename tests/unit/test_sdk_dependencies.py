"""The SDK installs and runs beside a seller's app with two small dependencies."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
from tally_sdk.decision import Decision
from tally_sdk.errors import AuthenticationError, error_for

SDK = Path(__file__).parents[2] / "sdk"


def test_the_sdk_depends_on_no_http_client() -> None:
    declared = tomllib.loads((SDK / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(d.split(">=")[0] for d in declared) == ["httptools", "orjson"]
    code = (
        "import sys, tally_sdk, tally_sdk.middleware, tally_sdk.leases;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'httpx', 'httpcore', 'anyio'}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_an_httpx_response_still_reads_as_a_decision_or_an_error() -> None:
    request = httpx.Request("POST", "http://tally/v1/enforce")
    refused = httpx.Response(
        429,
        json={"allowed": False, "customer": "acme", "retry_after": 3},
        headers={"RateLimit": '"q";r=0;t=3', "Retry-After": "3"},
        request=request,
    )
    decision = Decision.from_response(refused)
    assert (decision.allowed, decision.customer, decision.retry_after) == (False, "acme", 3)
    assert decision.headers["RateLimit"] == '"q";r=0;t=3'
    unknown = httpx.Response(401, json={"detail": "unknown key"}, request=request)
    error = error_for(unknown)
    assert isinstance(error, AuthenticationError) and "POST /v1/enforce → 401" in str(error)
