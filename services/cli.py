"""The ``tally`` command: one subcommand per service, plus ``up`` for all of them at once."""

from __future__ import annotations

from datetime import date
from typing import Annotated

import typer

from services.common.logging import configure
from services.common.settings import Settings, get_settings
from services.runtime import Runtime, Starter, run, serve

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
billing_app = typer.Typer(help="Rollups of raw events into usage_daily (and, later, invoices).")
app.add_typer(billing_app, name="billing")

PortOption = Annotated[int | None, typer.Option(help="HTTP port (default: TALLY_PORT)")]


def _settings() -> Settings:
    settings = get_settings()
    configure(settings.log_level, settings.log_json)
    return settings


def _require_kafka(settings: Settings, command: str) -> None:
    if settings.embedded_kafka:
        raise typer.BadParameter(
            f"`tally {command}` on its own needs KAFKA_BOOTSTRAP_SERVERS: the embedded broker "
            "lives only inside `tally up`."
        )


def _run(starters: list[Starter], port: int | None, prepare: bool = False) -> None:
    settings = _settings()
    if port is not None:
        settings = settings.model_copy(update={"port": port})

    async def main() -> None:
        async with Runtime(settings) as runtime:
            if prepare:
                await runtime.prepare()
            await serve(runtime, starters)

    run(main())


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="Also drive a synthetic workload")] = False,
    port: PortOption = None,
) -> None:
    """Run all four services in one process on the embedded defaults."""
    from services import demo as demo_load
    from services.aggregator import service as aggregator
    from services.api import service as api
    from services.billing import service as billing
    from services.ingest import service as ingest

    starters: list[Starter] = [aggregator.start, billing.start, ingest.start, api.start]
    if demo:
        starters.append(demo_load.start)
    _run(starters, port, prepare=True)


@app.command()
def ingest(port: PortOption = None) -> None:
    """Run the ingest service alone (needs KAFKA_BOOTSTRAP_SERVERS)."""
    from services.ingest import service

    _require_kafka(_settings(), "ingest")
    _run([service.start], port)


@app.command()
def aggregator(port: PortOption = None) -> None:
    """Run one aggregator worker; start several to share the partitions."""
    from services.aggregator import service

    _require_kafka(_settings(), "aggregator")
    _run([service.start], port)


@billing_app.callback(invoke_without_command=True)
def billing(ctx: typer.Context, port: PortOption = None) -> None:
    """Run the billing service (scheduled rollups) when no subcommand is given."""
    from services.billing import service

    if ctx.invoked_subcommand is None:
        _run([service.start], port)


@billing_app.command("rollup")
def billing_rollup(
    from_: Annotated[str, typer.Option("--from", help="First UTC day, YYYY-MM-DD")],
    to: Annotated[str, typer.Option("--to", help="Last UTC day (inclusive), YYYY-MM-DD")],
) -> None:
    """Recompute usage_daily/usage_monthly for a range of days, now."""
    from services.billing.service import rollup

    first, last = _day("--from", from_), _day("--to", to)
    if first > last:
        raise typer.BadParameter("--from must not be after --to")

    async def main() -> None:
        async with Runtime(_settings()) as runtime:
            report = await (await rollup(runtime)).run_range(first, last)
            typer.echo(
                f"rolled up {report.cells} customer-days into {report.rows} rows"
                f" (events stored up to {report.watermark.isoformat()})"
            )

    run(main())


@app.command()
def api(port: PortOption = None) -> None:
    """Run the query API alone."""
    from services.api import service

    _run([service.start], port)


@app.command()
def migrate() -> None:
    """Create the database, run migrations, load the catalog, create ClickHouse tables."""

    async def main() -> None:
        async with Runtime(_settings()) as runtime:
            await runtime.prepare()

    run(main())
    typer.echo("schema and catalog are up to date")


def _day(option: str, text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{option} must be a date as YYYY-MM-DD, got {text!r}") from exc


if __name__ == "__main__":
    app()
