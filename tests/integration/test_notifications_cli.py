"""``tally notifications list`` and ``resend`` against the real delivery log."""

from __future__ import annotations

import psycopg
import pytest
from typer.testing import CliRunner

from services import cli
from services.cli import app
from services.common.settings import Settings

runner = CliRunner()


def test_list_and_resend(
    settings: Settings, database_url: str, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    customer, msg = f"{tenant}-cli", f"msg_{tenant}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notifications (id, type, customer_id, occurred_at, payload)"
            " VALUES (%s, 'alert.triggered', %s, now(), '{}')",
            (msg, customer),
        )
        conn.execute(
            "INSERT INTO notification_deliveries (notification_id, channel, recipient, state,"
            " attempts) VALUES (%s, 'email', 'ops@example.com', 'failed', 8)",
            (msg,),
        )
    listed = runner.invoke(app, ["notifications", "list", "--customer", customer])
    assert listed.exit_code == 0, listed.output
    [line] = listed.output.splitlines()
    assert msg in line and "alert.triggered" in line
    assert "email:ops@example.com=failed(8)" in line

    resent = runner.invoke(app, ["notifications", "resend", msg])
    assert resent.exit_code == 0, resent.output
    assert "1 deliveries due again" in resent.output
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT state, attempts FROM notification_deliveries WHERE notification_id = %s",
            (msg,),
        ).fetchone()
    assert row == ("pending", 0)

    unknown = runner.invoke(app, ["notifications", "resend", "msg_nope"])
    assert unknown.exit_code == 1 and "no notification 'msg_nope'" in unknown.output
