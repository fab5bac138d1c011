"""Analytics SQL while Tally runs: `tally up` owns chDB, events go in over HTTP, and
`tally sql` (another process) reads them back through the running api — for the admin,
and for a customer's key, which sees only its own rows."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from schemas.events import utcnow
from services.common.settings import DEV_ADMIN_TOKEN, Settings
from tests.conftest import env_for
from tests.support import TALLY, TallyProcess, new_customer, sample_event, wait_for

pytestmark = pytest.mark.slow


def tally_sql(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TALLY, "sql", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_tally_sql_reads_the_running_tally(settings: Settings, tmp_path: Path) -> None:
    env = env_for(settings)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # `tally up` starts its own embedded broker
    up = TallyProcess(["up"], env, tmp_path / "up.log").start()
    try:
        token = settings.service_tokens[0]
        now = utcnow().isoformat()
        with httpx.Client(base_url=up.url, timeout=30) as client:
            mine, other = (new_customer(client) for _ in range(2))
            for customer, count in ((mine[0], 7), (other[0], 5)):
                events = [
                    sample_event(subject=customer, id=uuid.uuid4().hex, time=now)
                    for _ in range(count)
                ]
                reply = client.post(
                    "/v1/events", json=events, headers={"Authorization": f"Bearer {token}"}
                )
                assert reply.status_code == 202, reply.text
        cli_env = env | {"TALLY_ADMIN_TOKEN": DEV_ADMIN_TOKEN}
        sql = "SELECT customer, count() AS n FROM events WHERE customer IN {c:Array(String)}"
        sql += " GROUP BY customer ORDER BY customer"
        wanted = f"c=['{mine[0]}','{other[0]}']"

        def both_stored() -> bool:
            out = tally_sql(cli_env, sql, "--param", wanted, "--format", "json", "--url", up.url)
            return out.returncode == 0 and len(json.loads(out.stdout)["rows"]) == 2

        wait_for(both_stored, 60, "events in ClickHouse", up.tail)
        table = tally_sql(cli_env, sql, "--param", wanted, "--url", up.url)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["customer", "n"]
        assert sorted(line.split() for line in lines[2:4]) == sorted(
            [[mine[0], "7"], [other[0], "5"]]
        )
        as_key = tally_sql(cli_env, sql, "--param", wanted, "--url", up.url, "--token", mine[1])
        assert as_key.returncode == 0, as_key.stderr
        assert as_key.stdout.splitlines()[2].split() == [mine[0], "7"]
        refused = tally_sql(cli_env, "SELECT * FROM system.tables", "--url", up.url)
        assert refused.returncode == 1
        assert "system tables are not allowed" in refused.stderr
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.tail()
