"""The production shape on one machine: each service in its own process, as
docker-compose runs them, plus `tally up --demo` for the newcomer's first look."""

from __future__ import annotations

import os
import re
import subprocess
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest

from schemas.events import utcnow
from services.common.settings import Settings
from tests.conftest import env_for
from tests.support import TALLY, TallyProcess, sample_event, wait_for

pytestmark = pytest.mark.slow


def test_ingest_aggregator_and_api_as_separate_processes(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    env = env_for(settings)
    migrate = subprocess.run(
        [*TALLY, "migrate"], env=os.environ | env, capture_output=True, text=True, timeout=120
    )
    assert migrate.returncode == 0 and "up to date" in migrate.stdout, migrate.stderr
    services = [
        TallyProcess([name], env, tmp_path / f"{name}.log").start()
        for name in ("aggregator", "ingest", "api")
    ]
    aggregator, ingest, api = services
    try:
        customer = f"{tenant}-apart"
        sent = sample_event(subject=customer, id=f"{tenant}-1", time=utcnow().isoformat())
        answer = httpx.post(
            f"{ingest.url}/v1/events",
            content=orjson.dumps(sent),
            headers={
                "Authorization": f"Bearer {settings.service_tokens[0]}",
                "Content-Type": "application/cloudevents+json",
            },
        )
        assert answer.status_code == 202, answer.text

        def counted() -> bool:
            usage = httpx.get(
                f"{api.url}/v1/customers/{customer}/usage",
                params={"meter": "api_calls", "window": "hour"},
                headers={"Authorization": f"Bearer {settings.service_tokens[0]}"},
            ).json()
            return sum(Decimal(p["value"]) for p in usage["data"]) == 1

        wait_for(counted, 60, "the event through the api", aggregator.tail)
    finally:
        for service in reversed(services):
            assert service.stop() == 0, service.tail()


def test_up_demo_shows_counted_duplicate_and_rejected_events(
    settings: Settings, tmp_path: Path
) -> None:
    env = env_for(settings)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")
    up = TallyProcess(["up", "--demo"], env, tmp_path / "demo.log").start()
    try:

        def moving() -> bool:
            text = httpx.get(f"{up.url}/metrics").text
            return all(
                _metric(text, name) > 0
                for name in (
                    'tally_aggregator_events_total{outcome="counted"}',
                    'tally_aggregator_events_total{outcome="duplicate"}',
                    "tally_ingest_events_rejected_total",
                )
            )

        wait_for(moving, 60, "the demo's numbers to move", up.tail)
        # told by the process that decides, not the 0 of processes that never do
        text = httpx.get(f"{up.url}/metrics").text
        assert _metric(text, "tally_enforce_redis_available") == 1
    finally:
        assert up.stop() == 0, up.tail()


def _metric(text: str, name: str) -> float:
    pattern = "^" + re.escape(name) + r"(\{[^}]*\})? (\S+)$"
    return sum(float(m.group(2)) for m in re.finditer(pattern, text, re.M))
