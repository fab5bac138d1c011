"""The development secrets: said out loud in development, refused in production.

Each test runs `tally ingest` for real (a process that accepts service tokens, keys and
so the pepper), as docker-compose does, and reads what it logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import DEV_PEPPER, DEV_PORTAL_SECRET, Settings
from tests.conftest import env_for
from tests.support import TallyProcess

DEV = {
    "TALLY_SERVICE_TOKENS": "dev-service-token,test-token",
    "TALLY_ADMIN_TOKEN": "dev-admin-token",
    "TALLY_KEY_PEPPER": DEV_PEPPER,
    "TALLY_PORTAL_SECRET": DEV_PORTAL_SECRET,
}
REAL = {
    "TALLY_SERVICE_TOKENS": "svc-3f1e0c7b9a",
    "TALLY_ADMIN_TOKEN": "adm-8d2c4a6e1f",
    "TALLY_KEY_PEPPER": "pepper-5b7d9f1a3c",
    "TALLY_PORTAL_SECRET": "portal-0e9a7c5b3d",
}
NAMES = ("TALLY_SERVICE_TOKENS", "TALLY_ADMIN_TOKEN", "TALLY_KEY_PEPPER", "TALLY_PORTAL_SECRET")


def ingest(settings: Settings, tmp_path: Path, **env: str) -> TallyProcess:
    return TallyProcess(["ingest"], env_for(settings) | env, tmp_path / "ingest.log")


def test_development_secrets_are_named_in_a_warning(settings: Settings, tmp_path: Path) -> None:
    process = ingest(settings, tmp_path, **DEV).start()
    try:
        lines = process.tail(200).splitlines()
        [warning] = [line for line in lines if "development" in line.lower()]
        assert "warning" in warning.lower()
        for name in NAMES:
            assert name in warning, warning
    finally:
        assert process.stop() == 0, process.tail()


def test_production_refuses_development_secrets(settings: Settings, tmp_path: Path) -> None:
    process = ingest(settings, tmp_path, TALLY_ENV="production", **DEV)
    try:
        with pytest.raises(AssertionError, match="exited"):
            process.start(ready_timeout=60)
        assert process.process is not None and process.process.returncode != 0
        refusal = process.tail(200)
        assert "TALLY_ENV=production" in refusal
        for name in NAMES:
            assert name in refusal, refusal
    finally:
        process.stop()


def test_production_starts_with_real_secrets(settings: Settings, tmp_path: Path) -> None:
    process = ingest(settings, tmp_path, TALLY_ENV="production", **REAL).start()
    try:
        assert "development" not in process.tail(200).lower()
    finally:
        assert process.stop() == 0, process.tail()
