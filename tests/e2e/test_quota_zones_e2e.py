"""A customer billed in New York, in ``tally up``: the aggregator (its own process)
counts the customer's calls into the local month's quota counter, which the limits
status then reads, with the reset at local midnight on the 1st."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.events import utcnow
from schemas.zones import quota_month, zone
from services.common.settings import Settings
from tests.conftest import up_env
from tests.support import TallyProcess, sample_event, wait_for

pytestmark = pytest.mark.slow
ADMIN = "e2e-admin-token"
ZONE_BOUND_SECONDS = 1.5
"""A zone reaches every process within a second (``services.common.zone_book``)."""


def _quota(client: httpx.Client, customer: str) -> dict[str, Any]:
    reply = client.get(f"/v1/customers/{customer}/limits")
    assert reply.status_code == 200, reply.text
    [quota] = [p for p in reply.json()["limits"] if p.get("meter") == "api_calls"]
    return dict(quota)


def test_the_aggregator_counts_a_zoned_customers_local_month(
    settings: Settings, tmp_path: Path
) -> None:
    up = TallyProcess(["up"], up_env(settings, TALLY_ADMIN_TOKEN=ADMIN), tmp_path / "up.log")
    up.start()
    service = {"Authorization": f"Bearer {settings.service_tokens[0]}"}
    try:
        with httpx.Client(base_url=up.url, headers=service, timeout=30) as client:
            made = client.post(
                "/v1/admin/customers",
                json={"email": f"{uuid.uuid4().hex[:12]}@example.com", "timezone": "Asia/Tokyo"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert made.status_code == 201, made.text
            customer = made.json()["customer"]["id"]
            time.sleep(ZONE_BOUND_SECONDS)
            calls = [
                sample_event(id=uuid.uuid4().hex, subject=customer, time=utcnow().isoformat())
                for _ in range(3)
            ]
            assert client.post("/v1/events", json=calls).status_code == 202
            wait_for(
                lambda: _quota(client, customer)["used"] == 3,
                60,
                "the calls counted in the local month",
                up.tail,
            )
            month = quota_month(utcnow(), zone("Asia/Tokyo"))
            reset = _quota(client, customer)["reset"]
            assert abs(reset - (month.end - utcnow()).total_seconds()) < 5
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.tail()
