"""The metering model as a user meets it, in ``tally up``: a meter created over the admin
API counts nested LLM events from the next one on, one event feeds several meters, and
rollups apply the meter to the history in ClickHouse."""

from __future__ import annotations

import signal
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from schemas.events import utcnow
from services.common.settings import Settings
from tests.conftest import up_env
from tests.support import TallyProcess, wait_for

pytestmark = pytest.mark.slow
ADMIN = "e2e-admin-token"


def _call(customer: str, model: str, tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "llm-gateway",
        "type": "llm_call",
        "subject": customer,
        "time": utcnow().isoformat(),
        "data": {"model": model, "tokens": {"input": tokens_in, "output": tokens_out}},
    }


def _usage(client: httpx.Client, customer: str, meter: str, grouped: bool) -> dict[str, str]:
    params = {"meter": meter, "window": "day"} | ({"group_by": "model"} if grouped else {})
    reply = client.get(f"/v1/customers/{customer}/usage", params=params)
    assert reply.status_code == 200, reply.text
    points = reply.json()["data"]
    if grouped:
        return {p["groups"]["model"]: p["value"] for p in points}
    return {"*": points[-1]["value"]} if points else {}


def _rolled(settings: Settings, customer: str, meter: str) -> Decimal | None:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT value FROM usage_daily WHERE customer = %s AND meter = %s AND group_key = '*'",
            (customer, meter),
        ).fetchone()
    return None if row is None else row[0]


def test_a_new_meter_counts_nested_events_from_the_next_one(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    env = up_env(settings, TALLY_ADMIN_TOKEN=ADMIN)
    customer, suffix = f"{tenant}-acme", tenant.replace("-", "_")
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    service = {"Authorization": f"Bearer {settings.service_tokens[0]}"}
    try:
        with httpx.Client(base_url=up.url, headers=service, timeout=30) as client:
            before = client.post("/v1/events", json=[_call(customer, "gpt-4o", 1000, 1)])
            assert before.status_code == 202, before.text
            names = {"input": f"in_{suffix}", "output": f"out_{suffix}"}
            for which, name in names.items():
                meter = {
                    "name": name,
                    "event_type": "llm_call",
                    "aggregation": "sum",
                    "value_property": f"$.tokens.{which}",
                    "group_by": ["$.model"],
                }
                created = client.post(
                    "/v1/admin/meters", json=meter, headers={"Authorization": f"Bearer {ADMIN}"}
                )
                assert created.status_code == 201, created.text
            calls = [
                _call(customer, "gpt-4o", 812, 96),
                _call(customer, "gpt-4o", 188, 4),
                _call(customer, "mini", 50, 5),
            ]
            after = client.post("/v1/events", json=calls)
            assert after.status_code == 202 and after.json()["accepted"] == 3, after.text
            unreadable = client.post(
                "/v1/events", json=[_call(customer, "mini", 1, 1) | {"data": {"model": "x"}}]
            )
            assert unreadable.status_code == 422, unreadable.text
            assert "needs a number" in unreadable.text

            # The event before the meters is history: live counters start after the 201s.
            want = {
                "input": {"gpt-4o": "1000", "mini": "50"},
                "output": {"gpt-4o": "100", "mini": "5"},
            }
            wait_for(
                lambda: {k: _usage(client, customer, n, True) for k, n in names.items()} == want,
                60,
                "live input and output tokens",
                up.tail,
            )
            # Rollups apply the meter to every event in ClickHouse, the earlier one included.
            wait_for(
                lambda: _rolled(settings, customer, names["input"]) == Decimal(2050),
                60,
                "rolled-up input tokens",
                up.tail,
            )
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.tail()
