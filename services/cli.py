"""The ``tally`` command: one subcommand per service, plus ``up`` for all of them at once."""

from __future__ import annotations

import asyncio
import signal
from datetime import date
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from schemas.catalog import Catalog
from services.api.catalog import store as catalog_store
from services.common.logging import configure
from services.common.settings import Settings, get_settings
from services.runtime import DevelopmentSecrets, Runtime, Starter, run, serve

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
billing_app = typer.Typer(help="Rollups of raw events into usage_daily, and billing runs.")
app.add_typer(billing_app, name="billing")
stripe_app = typer.Typer(help="Stripe: the catalog mirrored as products, prices and meters.")
app.add_typer(stripe_app, name="stripe")
notifications_app = typer.Typer(help="Notifications: the delivery log, and resend.")
app.add_typer(notifications_app, name="notifications")
meters_app = typer.Typer(help="Meters: back-fill a new meter from the events stored before it.")
app.add_typer(meters_app, name="meters")

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


async def prepare(runtime: Runtime, with_clickhouse: bool = True) -> None:
    """Stores ready for every service: databases, migrations, ClickHouse tables and topics
    (``Runtime.prepare``), then the catalog seeded by its owner."""
    await runtime.prepare(with_clickhouse)
    path = runtime.settings.catalog_path
    await catalog_store.load(
        await runtime.pool(), Catalog.from_file(path) if path else Catalog.default()
    )


def _run(starters: list[Starter], port: int | None, prepare_stores: bool = False) -> None:
    settings = _settings()
    if port is not None:
        settings = settings.model_copy(update={"port": port})

    async def main() -> None:
        async with Runtime(settings) as runtime:
            if prepare_stores:
                await prepare(runtime)
            await serve(runtime, starters)

    try:
        run(main())
    except DevelopmentSecrets as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="Also drive a synthetic workload")] = False,
    port: PortOption = None,
    role: Annotated[
        str | None, typer.Option(hidden=True, help="front or back: one of tally up's processes")
    ] = None,
    back_url: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run all four services on the embedded defaults: a supervisor of two processes
    (ingest and the API on the port; the aggregator, billing and analytics SQL behind)."""
    from services.up import gate, supervisor

    if role is None:  # the supervisor imports no service: its children do, meanwhile
        settings = _settings()
        if port is not None:
            settings = settings.model_copy(update={"port": port})
        code = 0

        async def main() -> None:
            nonlocal code
            # back's aggregator creates the ClickHouse tables as it starts, before anything
            # reads them: the supervisor need not load chDB (~0.5 s) only to close it again
            stores = partial(prepare, with_clickhouse=False)
            code = await supervisor.Supervisor(settings, stores, demo).run()

        run(main())
        raise typer.Exit(code)
    if role == supervisor.FRONT and back_url:
        from services import demo as demo_load
        from services.api import service as api
        from services.ingest import service as ingest
        from services.up import proxy

        starters = [ingest.start, api.start_without_analytics, proxy.starter(back_url)]
        gate.wait()  # imported; the stores are prepared once the supervisor opens it
        _run([*starters, demo_load.start] if demo else starters, port)
    elif role == supervisor.BACK:  # the aggregator first: it opens chDB, analytics reads it
        from services.aggregator import service as aggregator
        from services.api import service as api
        from services.billing import service as billing
        from services.common import shutdown

        signal.signal(shutdown.HURRY, signal.SIG_IGN)  # a stop before the aggregator runs
        gate.wait()
        _run([aggregator.start, billing.start, api.start_analytics], port)
    else:
        raise typer.BadParameter("--role is front (with --back-url) or back")


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


@meters_app.command("backfill")
def meters_backfill(
    name: Annotated[str, typer.Argument(help="The meter, e.g. llm_input_tokens")],
) -> None:
    """Count a meter's history: rollups over every day with its events, and its live
    counters (buckets still in Redis) for the events stored before it counted live.
    Running it again adds nothing twice.  It opens ClickHouse itself: with the embedded
    chDB, run it while `tally up` is stopped."""
    from schemas.events import utcnow
    from services.aggregator.backfill import backfill_live
    from services.aggregator.redis_sink import RedisSink
    from services.billing.service import rollup
    from services.common import catalog

    async def main() -> None:
        async with Runtime(_settings()) as runtime:
            async with (await runtime.pool()).connection() as conn:
                current = await catalog.current(conn)
            meter = next((m for m in current.meters if m.name == name), None)
            if meter is None:
                raise typer.BadParameter(f"no meter {name!r} counts now", param_hint="NAME")
            first = await _first_day(runtime, meter.event_type)
            if first is not None:
                report = await (await rollup(runtime)).run_range(first, utcnow().date())
                typer.echo(
                    f"rolled up {report.cells} customer-days from {first} into {report.rows} rows"
                )
            counting_from = current.counting_from.get(name, 0)
            live = await backfill_live(
                runtime.clickhouse(),
                RedisSink(runtime.redis()),
                meter,
                counting_from,
                utcnow(),
                (await runtime.zones()).zone,
            )
            typer.echo(
                f"live counters: {live.events} events stamped before version {counting_from}"
                f" added for {live.customers} customers ({live.already} done by an earlier run)"
            )

    run(main())


async def _first_day(runtime: Runtime, event_type: str) -> date | None:
    client = runtime.clickhouse()
    [[first]] = await asyncio.to_thread(
        client.query,
        f"SELECT toString(min(toDate(time))) FROM {client.database}.events"
        " WHERE type = {type:String}",
        {"type": event_type},
    )
    day = date.fromisoformat(first)
    return None if day.year == 1970 else day


@billing_app.command("run")
def billing_run(
    period: Annotated[str, typer.Option(help="Bill the periods starting in this month, YYYY-MM")],
    finalize: Annotated[
        bool, typer.Option(help="Finalize the drafts now, without waiting out the grace period")
    ] = False,
) -> None:
    """Invoice every customer whose period starting in --period has ended; idempotent."""
    from services.billing.invoicing.periods import parse_month
    from services.billing.service import billing_run as make_run

    try:
        month = parse_month(period)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--period") from None

    async def main() -> None:
        async with Runtime(_settings()) as runtime:
            report = await (await make_run(runtime)).run(month, finalize=finalize)
            typer.echo(
                f"{report.period}: {report.customers} customers, {report.written} invoices"
                f" written, {report.skipped} without a closed period"
                + (f" (resumed after {report.resumed_after})" if report.resumed_after else "")
            )

    run(main())


@stripe_app.command("sync")
def stripe_sync() -> None:
    """Mirror the catalog in Stripe now and print what changed, as JSON; idempotent.

    The billing service does the same every TALLY_STRIPE_SYNC_INTERVAL_SECONDS."""
    import dataclasses

    import orjson

    from services.billing.stripe import client as stripe_client
    from services.billing.stripe import mirror as stripe_mirror

    settings = _settings()
    api = stripe_client.client(settings)
    if api is None:
        raise typer.BadParameter("set STRIPE_API_KEY to mirror the catalog in Stripe")

    async def main() -> None:
        async with Runtime(settings) as runtime:
            report = await stripe_mirror.sync(await runtime.pool(), api)
            typer.echo(orjson.dumps(dataclasses.asdict(report), option=orjson.OPT_INDENT_2))

    run(main())


@notifications_app.command("list")
def notifications_list(
    customer: Annotated[str | None, typer.Option(help="Only this customer's")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first")] = 20,
) -> None:
    """The newest notifications, one line each: when, id, type, customer, and each
    delivery as channel:recipient=state (attempts)."""
    from services.billing.notification import history

    async def main() -> None:
        async with Runtime(_settings()) as runtime, (await runtime.pool()).connection() as conn:
            for n in await history.page(conn, customer, limit, None, own=False):
                sent = " ".join(
                    f"{d.channel}:{d.endpoint_id or d.recipient}={d.state}({d.attempts})"
                    for d in n.deliveries
                )
                typer.echo(
                    f"{n.created_at:%Y-%m-%dT%H:%M:%SZ}  {n.id}  {n.type}  {n.customer}  {sent}"
                )

    run(main())


@notifications_app.command("resend")
def notifications_resend(
    notification: Annotated[str, typer.Argument(help="The notification's id (msg_…)")],
) -> None:
    """Deliver a notification again on every channel; a running billing service sends it
    within a second.  The attempts already made stay in the log."""
    from services.billing.notification import history
    from services.common.problems import Problem

    async def main() -> None:
        async with Runtime(_settings()) as runtime:
            pool = await runtime.pool()
            async with pool.connection() as conn, conn.transaction():
                count = await history.resend(conn, notification, own=False)
                if not count:
                    await history.customer_of(conn, notification)  # 404 when unknown
            typer.echo(f"{notification}: {count} deliveries due again")

    try:
        run(main())
    except Problem as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(1) from None


@app.command()
def rate(
    plan: Annotated[str, typer.Option(help="The plan's id in the catalog")],
    usage: Annotated[list[str] | None, typer.Option(help="meter=quantity, once per meter")] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="A catalog YAML file (default: the built-in one)")
    ] = None,
    period_days: Annotated[
        int | None, typer.Option(help="Rate the last N days of a period (prorates the fee)")
    ] = None,
) -> None:
    """Print the invoice a plan would produce for some usage, as JSON."""
    from schemas.catalog import Catalog
    from services.billing.invoicing.simulate import parse_usage, simulate

    try:
        chosen = Catalog.from_file(catalog) if catalog else Catalog.default()
        invoice = simulate(chosen, plan, parse_usage(usage or []), period_days)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(
        invoice.model_dump_json(
            indent=2, exclude={"id", "status", "computed_at", "finalized_at", "customer"}
        )
    )


@app.command()
def api(port: PortOption = None) -> None:
    """Run the query API alone."""
    from services.api import service

    _run([service.start], port)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="One SELECT over events, daily_usage, …")],
    param: Annotated[
        list[str] | None, typer.Option("--param", help="name=value for {name:Type}; repeat")
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="table, json or csv", case_sensitive=False)
    ] = "table",
    customer: Annotated[str | None, typer.Option(help="Only this customer's rows")] = None,
    url: Annotated[
        str | None, typer.Option(help="The running Tally (default: TALLY_HOST:TALLY_PORT)")
    ] = None,
    token: Annotated[str | None, typer.Option(help="Default: TALLY_ADMIN_TOKEN")] = None,
) -> None:
    """Run analytics SQL on the running Tally (docs/analytics.md) and print the rows."""
    from services.api.analytics import client

    if format_.lower() not in ("table", "json", "csv"):
        raise typer.BadParameter("--format must be table, json or csv")
    settings = get_settings()
    base = url or f"http://{settings.host}:{settings.port}"
    status = client.main(
        base, token or settings.admin_token, query, param or [], format_.lower(), customer
    )
    raise typer.Exit(status)


@app.command()
def migrate() -> None:
    """Create the database, run migrations, load the catalog, create ClickHouse tables."""

    async def main() -> None:
        async with Runtime(_settings()) as runtime:
            await prepare(runtime)

    run(main())
    typer.echo("schema and catalog are up to date")


def _day(option: str, text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{option} must be a date as YYYY-MM-DD, got {text!r}") from exc


if __name__ == "__main__":
    app()
