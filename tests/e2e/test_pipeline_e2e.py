"""The whole pipeline, as a user runs it: ``tally up`` in its own process, events over HTTP.

10,000 events for 50 customers, 5 % of them re-sent in later requests, 1 % invalid.
Redis counters, the usage API, ``usage_daily``/``usage_monthly`` and the ClickHouse rows
must all equal what the test computes on its own from the events it sent.
"""

from __future__ import annotations

import random
import signal
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from schemas import redis_keys
from schemas.events import from_micros, utcnow
from schemas.windows import Window
from services.common import clickhouse
from services.common.settings import Settings
from tests.conftest import env_for, up_env
from tests.support import TallyProcess, wait_for
from tests.workload import ENDPOINTS, Key, Workload, generate, rollup_cells, stored_totals

pytestmark = pytest.mark.slow
METERS = ("api_calls", "compute_seconds", "storage_gb", "active_users")


def test_ten_thousand_events_add_up_everywhere(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    env = up_env(settings)  # `tally up` starts its own embedded broker
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    try:
        work = generate(tenant, customers=50, events=10_000, now=utcnow())
        _send(up.url, work, settings.service_tokens[0])
        wait_for(lambda: _redis_days(settings, work) == work.daily, 120, "Redis", up.tail)
        _check_api(up.url, work, settings.service_tokens[0])
        for table, want in (("usage_daily", work.daily), ("usage_monthly", work.monthly)):
            _wait_for_rollup(settings, table, tenant, want)
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.tail()
    _check_clickhouse(settings, work)


def _send(url: str, work: Workload, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    accepted = rejected = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for batch in work.requests(500, random.Random(2)):
            answer = client.post("/v1/events", content=orjson.dumps(batch))
            assert answer.status_code == 202, answer.text
            accepted += answer.json()["accepted"]
            rejected += answer.json()["rejected"]
    assert rejected == len(work.invalid)
    assert accepted == len(work.valid) + len(work.duplicates)


def _redis_days(settings: Settings, work: Workload) -> dict[Key, Decimal]:
    client = redis.Redis.from_url(settings.redis_url)
    found: dict[Key, Decimal] = {}
    for customer, meter, day, _ in {(k[0], k[1], k[2], "*") for k in work.daily}:
        bucket = day.strftime("%Y%m%d")
        fields = client.hgetall(redis_keys.counters(customer, meter, Window.DAY, bucket))
        for raw_field, raw in fields.items():
            name = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
            if name.endswith(redis_keys.TIME_SUFFIX):
                continue
            group = redis_keys.parse_group(name)
            found[(customer, meter, day, group[0] if group else "*")] = from_micros(int(raw))
    client.close()
    return found


def _check_api(url: str, work: Workload, token: str) -> None:
    today = utcnow().date()
    start = datetime.combine(today - timedelta(days=2), time(), UTC)
    end = datetime.combine(today + timedelta(days=1), time(), UTC)
    customers = sorted({k[0] for k in work.daily})
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=30, headers=auth) as client:
        for customer in customers[:10]:
            for meter in METERS:
                params = {
                    "meter": meter,
                    "window": "day",
                    "from": start.isoformat(),
                    "to": end.isoformat(),
                }
                body = client.get(f"/v1/customers/{customer}/usage", params=params).json()
                for point in body["data"]:
                    day = datetime.fromisoformat(point["start"]).date()
                    want = work.daily.get((customer, meter, day, "*"), Decimal(0))
                    assert Decimal(point["value"]) == want, (customer, meter, day)
            grouped = client.get(
                f"/v1/customers/{customer}/usage",
                params={"meter": "api_calls", "window": "month", "group_by": "endpoint"},
            ).json()["data"]
            for point in grouped:
                month = datetime.fromisoformat(point["start"]).date()
                endpoint = point["groups"]["endpoint"]
                assert endpoint in ENDPOINTS
                assert (
                    Decimal(point["value"])
                    == work.monthly[(customer, "api_calls", month, endpoint)]
                )


def _wait_for_rollup(settings: Settings, table: str, tenant: str, want: dict[Key, Decimal]) -> None:
    def found() -> dict[Key, Decimal]:
        return rollup_cells(settings.database_url, table, tenant)

    wait_for(lambda: found() == want, 60, table, lambda: _diff(found(), want))


def _diff(found: dict[Key, Decimal], want: dict[Key, Decimal]) -> str:
    keys = found.keys() | want.keys()
    wrong = {k: (found.get(k), want.get(k)) for k in keys if found.get(k) != want.get(k)}
    return f"{len(wrong)} cells differ (found, want), e.g. {list(wrong.items())[:5]}"


def _check_clickhouse(settings: Settings, work: Workload) -> None:
    client = clickhouse.connect(settings)
    try:
        assert stored_totals(client, work.tenant) == work.totals()
    finally:
        client.close()


def test_ctrl_c_right_after_the_last_202_loses_nothing(
    settings: Settings, tmp_path: Path, tenant: str
) -> None:
    """The embedded broker dies with the process: Ctrl-C must first aggregate all it took."""
    env = env_for(settings)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    work = generate(tenant, customers=20, events=8_000, now=utcnow(), invalid_share=0, seed=9)
    try:
        _send(up.url, work, settings.service_tokens[0])
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.tail()
    assert _redis_days(settings, work) == work.daily
