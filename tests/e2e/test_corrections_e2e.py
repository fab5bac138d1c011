"""Usage corrections as an operator meets them, in ``tally up``: a correction changes the
live counters (so quotas and the usage API) and the rollups (so invoices), exactly once
however often it is retried; what cannot be corrected is refused naming the field."""

from __future__ import annotations

import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
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

NOT_RFC_3339 = "must be an RFC 3339 date-time, e.g. 2026-11-01T00:00:00Z"

pytestmark = pytest.mark.slow
ADMIN = "e2e-admin-token"
PATH = "/v1/customers/{}/usage/corrections"


def _call(customer: str, endpoint: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "gateway",
        "type": "api_call",
        "subject": customer,
        "time": utcnow().isoformat(),
        "data": {"endpoint": endpoint},
    }


def _usage(client: httpx.Client, customer: str) -> dict[str, str]:
    params = {"meter": "api_calls", "window": "month", "group_by": "endpoint"}
    reply = client.get(f"/v1/customers/{customer}/usage", params=params)
    assert reply.status_code == 200, reply.text
    return {p["groups"]["endpoint"]: p["value"] for p in reply.json()["data"]}


def _rolled(settings: Settings, customer: str) -> dict[str, Decimal]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT group_key, sum(value) FROM usage_daily"
            " WHERE customer = %s AND meter = 'api_calls' GROUP BY group_key",
            (customer,),
        ).fetchall()
    return {key: value for key, value in rows}


def _refused(client: httpx.Client, path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
    reply = client.post(path, json=body)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = reply.json()
    return problem


def _post(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        return client.post(path, json=body).status_code


def test_a_correction_counts_once_live_and_in_rollups(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    env = up_env(settings, TALLY_ADMIN_TOKEN=ADMIN)
    customer = f"{tenant}-acme"
    path = PATH.format(customer)
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    service = {"Authorization": f"Bearer {settings.service_tokens[0]}"}
    try:
        with httpx.Client(base_url=up.url, headers=service, timeout=30) as client:
            calls = [_call(customer, "/search") for _ in range(5)] + [_call(customer, "/chat")]
            assert client.post("/v1/events", json=calls).status_code == 202
            wait_for(
                lambda: _usage(client, customer) == {"/search": "5", "/chat": "1"},
                60,
                "the calls counted",
                up.tail,
            )
            now = utcnow()
            good = {
                "id": f"corr-{tenant}",
                "meter": "api_calls",
                "time": (now - timedelta(seconds=30)).isoformat(),
                "delta": "-2",
                "groups": {"endpoint": "/search"},
                "reason": "two retries of the gateway were counted as calls",
            }

            forged = _call(customer, "/search") | {"type": "tally.correction"}
            assert client.post("/v1/events", json=[forged]).status_code == 422
            problem = _refused(client, path, good | {"meter": "storage_gb", "groups": {}}, 422)
            assert problem["errors"][0]["field"] == "body.meter"
            assert "only sum and count" in problem["detail"]
            problem = _refused(client, path, good | {"meter": "nope"}, 422)
            assert problem["errors"][0]["field"] == "body.meter"
            problem = _refused(client, path, good | {"groups": {}}, 422)
            assert problem["errors"][0]["field"] == "body.groups"
            assert "endpoint" in problem["detail"]
            problem = _refused(client, path, good | {"value": "3"}, 422)
            assert "either delta or value" in problem["detail"]
            problem = _refused(client, path, good | {"delta": "-6"}, 422)
            assert problem["type"].endswith("/negative-usage")
            assert "counted 5" in problem["detail"]
            problem = _refused(client, path, good | {"delta": "0.5"}, 422)
            assert problem["errors"][0]["field"] == "body.delta"
            future = (now + timedelta(hours=1)).isoformat()
            problem = _refused(client, path, good | {"time": future}, 422)
            assert problem["errors"][0]["field"] == "body.time"
            problem = _refused(client, path, good | {"time": "2026-11-01T00:00:00"}, 422)
            assert problem["errors"][0]["field"] == "body.time"
            problem = _refused(client, path, good | {"time": int(now.timestamp())}, 422)
            assert problem["errors"] == [{"field": "body.time", "reason": NOT_RFC_3339}]
            assert client.post(path, json=good, headers={"Authorization": ""}).status_code == 401

            made = client.post(path, json=good)
            assert made.status_code == 201, made.text
            assert made.json()["delta"] == "-2" and made.json()["counted"] == "5"
            again = client.post(path, json=good)
            assert again.status_code == 200 and again.json() == made.json()
            assert client.post(path, json=good | {"delta": "-1"}).status_code == 409
            to_three = good | {"id": f"set-{tenant}", "value": "3", "groups": {"endpoint": "/chat"}}
            del to_three["delta"]
            set_total = client.post(
                path, json=to_three, headers={"Authorization": f"Bearer {ADMIN}"}
            )
            assert set_total.status_code == 201, set_total.text
            assert set_total.json()["delta"] == "2" and set_total.json()["actor"] == "admin"

            wait_for(
                lambda: _usage(client, customer) == {"/search": "3", "/chat": "3"},
                60,
                "the corrections counted live",
                up.tail,
            )
            wait_for(
                lambda: _rolled(settings, customer) == {"*": 6, '["/search"]': 3, '["/chat"]': 3},
                60,
                "the corrections rolled up",
                up.tail,
            )
            listed = client.get(path).json()["corrections"]
            assert [c["id"] for c in listed] == [f"set-{tenant}", f"corr-{tenant}"]
            assert listed[1]["reason"] == good["reason"]

            # Five decreases of one at once against 3 counted: exactly three are made.
            chat = {k: v for k, v in good.items() if k != "id"} | {"groups": {"endpoint": "/chat"}}
            with ThreadPoolExecutor(5) as pool:
                replies = list(
                    pool.map(
                        lambda _: _post(up.url, path, chat | {"delta": "-1"}, service), range(5)
                    )
                )
            assert sorted(replies) == [201, 201, 201, 422, 422]
            wait_for(
                lambda: _usage(client, customer) == {"/search": "3", "/chat": "0"},
                60,
                "the decreases counted",
                up.tail,
            )
            # Counted, they hold nothing back: once an increase of 2 is counted too, a
            # decrease of 2 is checked against 2 (an increase in flight is not counted on).
            assert client.post(path, json=chat | {"delta": "2"}).status_code == 201
            wait_for(lambda: _usage(client, customer)["/chat"] == "2", 60, "the increase", up.tail)
            assert client.post(path, json=chat | {"delta": "-2"}).status_code == 201
            assert client.post(path, json=chat | {"delta": "-1"}).status_code == 422
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.tail()
