"""``tally rate``: the pricing simulator, and its answers to bad input."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from typer.testing import CliRunner

from services.cli import app

runner = CliRunner()


def rate(*args: str):
    return runner.invoke(app, ["rate", *args])


def test_payg_from_the_brief() -> None:
    result = rate("--plan", "payg", "--usage", "api_calls=10000000", "--usage", "storage_gb=150")
    assert result.exit_code == 0, result.output
    invoice = json.loads(result.output)
    lines = {line["meter"]: Decimal(line["amount"]) for line in invoice["lines"]}
    assert lines == {
        "api_calls": Decimal("2340.00"),
        "compute_seconds": 0,
        "storage_gb": Decimal("31.25"),
    }
    assert Decimal(invoice["total"]) == Decimal("2371.25")


def test_a_price_change_tried_from_a_catalog_file(tmp_path: Path) -> None:
    catalog = (Path(__file__).parents[2] / "schemas/catalog/default.yaml").read_text()
    changed = tmp_path / "catalog.yaml"
    changed.write_text(catalog.replace('unit_price: "0.001"}', 'unit_price: "0.002"}'))
    result = rate(
        "--catalog",
        str(changed),
        "--plan",
        "starter",
        "--usage",
        "api_calls=60000",
        "--period-days",
        "15",
    )
    assert result.exit_code == 0, result.output
    invoice = json.loads(result.output)
    fee, calls = invoice["lines"]
    assert Decimal(calls["amount"]) == Decimal("20.00")  # 10,000 over at the new 0.002
    assert Decimal(fee["quantity"]) < 1 and fee["description"].endswith("of the period)")


def test_bad_input_is_named() -> None:
    cases = {
        ("--plan", "gold"): "unknown plan 'gold'",
        ("--plan", "free", "--usage", "storage_gb=3"): "prices no storage_gb",
        ("--plan", "free", "--usage", "api_calls=-1"): "api_calls=-1",
        ("--plan", "free", "--usage", "api_calls"): "expected meter=quantity",
        ("--plan", "free", "--usage", "api_calls=1", "--usage", "api_calls=2"): "given twice",
        ("--plan", "free", "--period-days", "0"): "--period-days",
        ("--plan", "free", "--catalog", "/nonexistent.yaml"): "nonexistent.yaml",
    }
    for args, message in cases.items():
        result = rate(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_billing_run_names_a_bad_period() -> None:
    for period in ("2026-13", "November", "2026-11-01"):
        result = runner.invoke(app, ["billing", "run", "--period", period])
        assert result.exit_code == 2, (period, result.output)
        assert "YYYY-MM" in " ".join(result.output.split())
