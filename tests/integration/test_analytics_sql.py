"""Analytics SQL over real chDB, PostgreSQL and Redis: tenant isolation whatever the SQL,
the admin's view, parameters, limits, formats, refusals and credentials; the read-only
connection refusing what the guard would never pass; and the docs' example queries."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.envelope import StoredEvent
from schemas.events import utcnow
from services.aggregator.clickhouse_sink import ClickHouseSink
from services.api import service as api_service
from services.api.analytics import functions
from services.api.analytics.guard import Guarded, Refused, guard
from services.api.analytics.routes import Analytics
from services.api.analytics.routes import router as analytics_router
from services.api.analytics.runner import Runner, reader_settings
from services.billing.invoicing.mirror import InvoiceMirror
from services.billing.invoicing.run import BillingRun
from services.common.auth import Authenticator
from services.common.clickhouse import ClickHouse, ClickHouseError
from services.common.problems import Problem
from services.common.settings import DEV_ADMIN_TOKEN, Settings
from services.runtime import Component, Runtime, http_app
from tests.accounts_support import random_address, sign_up
from tests.billing_support import at, record_usage, subscribe
from tests.conftest import PARTITIONS, REDIS_URL

D = Decimal
DOCS = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
ADMIN = {"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"}
PER_CUSTOMER = {"a": 120, "b": 30}
MAX_ROWS = 110
SQL_PATH = "/v1/analytics/sql"


@dataclass
class World:
    client: httpx.AsyncClient
    ch: ClickHouse
    settings: Settings
    a: str
    b: str
    key_a: str
    key_b: str

    async def sql(self, sql: str, key: str | None = None, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else ADMIN
        return await self.client.post(SQL_PATH, json={"sql": sql, **body}, headers=headers)

    async def rows(self, sql: str, key: str | None = None, **body: Any) -> list[list[Any]]:
        reply = await self.sql(sql, key, **body)
        assert reply.status_code == 200, reply.text
        rows: list[list[Any]] = reply.json()["rows"]
        return rows


def events(customer: str, count: int) -> list[StoredEvent]:
    now = utcnow()
    return [
        StoredEvent(
            id=f"e{i}",
            source="test",
            type="api_call",
            customer=customer,
            time=now - timedelta(days=i % 3, minutes=i),
            value=Decimal(i % 7) + Decimal("0.5"),
            dimensions={"endpoint": f"/v1/{i % 4}", "user": f"u{i % 9}"},
            received_at=now,
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> AsyncIterator[World]:
    """`tally up`'s api over one chDB the process opened first, as the aggregator does;
    two customers' events written through the aggregator's sink (twice: duplicates
    collapse)."""
    settings = Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        data_dir=tmp_path_factory.mktemp("analytics"),
        events_partitions=PARTITIONS,
        service_tokens=["test-token"],
        analytics_max_execution_seconds=1.0,
        analytics_max_rows=MAX_ROWS,
    )
    async with Runtime(settings) as runtime:
        from services.common import clickhouse

        ch = runtime.clickhouse()
        clickhouse.create_schema(ch)
        app = http_app([Component("aggregator"), await api_service.start(runtime)])
        transport = httpx.ASGITransport(app, client=(random_address(), 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first, second = await sign_up(client), await sign_up(client)
            sink = ClickHouseSink(ch)
            for account, name in ((first, "a"), (second, "b")):
                batch = events(account.customer, PER_CUSTOMER[name])
                await sink.write(batch)
                await sink.write(batch[:10])  # a replay: the view reads FINAL
            yield World(
                client, ch, settings, first.customer, second.customer, first.key, second.key
            )


A, B = PER_CUSTOMER["a"], PER_CUSTOMER["b"]
SHAPES = [  # (sql, what A's key counts, what the admin counts)
    ("SELECT count() FROM events", A, A + B),
    (
        "SELECT count() FROM events AS e JOIN daily_usage AS d ON e.customer = d.customer"
        " AND toDate(e.time) = d.day AND e.type = d.type",
        A,
        A + B,
    ),
    (
        "SELECT count() FROM (SELECT id FROM events UNION ALL SELECT id FROM events"
        " WHERE customer = {other:String})",
        A,
        A + B + B,
    ),
    ("SELECT count() FROM (SELECT * FROM events WHERE value >= 0)", A, A + B),
    ("WITH mine AS (SELECT * FROM events) SELECT count() FROM mine", A, A + B),
    (
        "SELECT count() FROM events WHERE customer IN (SELECT customer FROM daily_usage)",
        A,
        A + B,
    ),
    ("SELECT count() FROM events WHERE customer = {other:String} OR 1 = 1", A, A + B),
]


@pytest.mark.parametrize(("sql", "mine", "everyone"), SHAPES)
async def test_a_key_sees_only_its_own_rows(
    world: World, sql: str, mine: int, everyone: int
) -> None:
    params = {"other": world.b}
    assert await world.rows(sql, world.key_a, params=params) == [[mine]]
    assert await world.rows(sql, params=params) == [[everyone]]


async def test_naming_another_customer_in_sql_finds_nothing(world: World) -> None:
    sql = "SELECT count(), groupUniqArray(customer) FROM events WHERE customer = {c:String}"
    assert await world.rows(sql, world.key_a, params={"c": world.b}) == [[0, []]]
    assert await world.rows(sql, world.key_b, params={"c": world.b}) == [[30, [world.b]]]


async def test_a_key_naming_another_customer_is_forbidden(world: World) -> None:
    reply = await world.sql("SELECT 1", world.key_a, customer=world.b)
    assert reply.status_code == 403
    assert reply.json()["type"].endswith("/forbidden")


async def test_the_admin_sees_everyone_or_narrows_to_one(world: World) -> None:
    sql = "SELECT customer, count() FROM events GROUP BY customer ORDER BY customer"
    both = await world.rows(sql)
    assert {tuple(r) for r in both} == {(world.a, 120), (world.b, 30)}
    assert await world.rows(sql, customer=world.b) == [[world.b, 30]]


async def test_a_service_token_acts_for_the_customer_it_names(world: World) -> None:
    reply = await world.sql("SELECT count() FROM events", "test-token")
    assert reply.status_code == 422 and "customer" in reply.json()["detail"]
    assert [e["field"] for e in reply.json()["errors"]] == ["body.customer"]
    assert await world.rows("SELECT count() FROM events", "test-token", customer=world.b) == [[30]]


async def test_parameters_are_bound_typed(world: World) -> None:
    sql = "SELECT count() FROM events WHERE toUInt32(value) >= {min:UInt32}"
    expected = sum(1 for i in range(120) if i % 7 >= 5)
    assert await world.rows(sql, world.key_a, params={"min": 5}) == [[expected]]
    reply = await world.sql(sql, world.key_a, params={"min": "many"})
    assert reply.status_code == 400 and reply.json()["reason"] == "clickhouse"


async def test_decimals_come_back_exact(world: World) -> None:
    reply = await world.sql("SELECT sum(value) AS total FROM events", world.key_b)
    body = reply.json()
    assert body["columns"] == [{"name": "total", "type": "Decimal(38, 6)"}]
    assert Decimal(body["rows"][0][0]) == sum(Decimal(i % 7) + Decimal("0.5") for i in range(30))


async def test_default_limit_cap_and_truncation(world: World) -> None:
    plain = (await world.sql("SELECT id FROM events", world.key_a)).json()
    assert len(plain["rows"]) == 100 and plain["truncated"] is True
    asked = (await world.sql("SELECT id FROM events LIMIT 10", world.key_a)).json()
    assert len(asked["rows"]) == 10 and asked["truncated"] is False
    capped = (await world.sql("SELECT id FROM events LIMIT 1000", world.key_a)).json()
    assert len(capped["rows"]) == MAX_ROWS and capped["truncated"] is True
    small = (await world.sql("SELECT id FROM events", world.key_b)).json()
    assert len(small["rows"]) == 30 and small["truncated"] is False
    assert small["rows_read"] >= 30 and small["elapsed_ms"] >= 0


async def test_a_query_over_the_time_limit_is_a_422_naming_it(world: World) -> None:
    sql = "SELECT count() FROM events AS a, events AS b, events AS c, events AS d, events AS e"
    reply = await world.sql(sql)
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert body["type"].endswith("/sql-limit-exceeded") and body["limit"] == "time"
    assert "TALLY_ANALYTICS_MAX_EXECUTION_SECONDS" in body["detail"]


async def test_csv(world: World) -> None:
    sql = "SELECT day, sum(events) AS events FROM daily_usage GROUP BY day ORDER BY day"
    reply = await world.sql(sql, world.key_b, format="csv")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/csv")
    assert reply.headers["tally-truncated"] == "false"
    rows = list(csv.reader(io.StringIO(reply.text)))
    assert rows[0] == ["day", "events"]
    assert sum(int(r[1]) for r in rows[1:]) == 30


@pytest.mark.parametrize(
    ("sql", "kind", "reason"),
    [
        ("SELECT * FROM system.tables", "sql-not-allowed", "system-table"),
        ("SELECT 1 SETTINGS readonly = 0", "sql-not-allowed", "settings"),
        ("INSERT INTO events SELECT * FROM events", "sql-not-allowed", "not-select"),
        ("SELECT * FROM file('/etc/passwd')", "sql-not-allowed", "table-function"),
        ("SELECT file('/etc/hostname')", "sql-not-allowed", "function"),
        ("SELECT * FROM events WHERE", "sql-invalid", "syntax"),
        ("SELECT nope FROM events", "sql-invalid", "clickhouse"),
    ],
)
async def test_refusals_are_400_problems_naming_the_reason(
    world: World, sql: str, kind: str, reason: str
) -> None:
    reply = await world.sql(sql, world.key_a)
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body = reply.json()
    assert body["type"].endswith(f"/{kind}") and body["reason"] == reason
    assert body["detail"]


async def test_reserved_parameters_are_refused(world: World) -> None:
    reply = await world.sql("SELECT 1", world.key_a, params={"__tenant": world.b})
    assert reply.status_code == 400 and reply.json()["reason"] == "reserved-parameter"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer tally_test_notakey"}, 401),
        ({"Authorization": "Bearer wrong-admin"}, 401),
    ],
)
async def test_credentials(world: World, headers: dict[str, str], status: int) -> None:
    reply = await world.client.post(SQL_PATH, json={"sql": "SELECT 1"}, headers=headers)
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/problem+json"


async def test_a_key_without_usage_read_is_refused(world: World) -> None:
    reply = await world.client.post(
        "/v1/keys",
        json={"scopes": ["ingest"]},
        headers={"Authorization": f"Bearer {world.key_a}"},
    )
    assert reply.status_code == 201, reply.text
    refused = await world.sql("SELECT count() FROM events", reply.json()["key"])
    assert refused.status_code == 403
    assert refused.json()["type"].endswith("/insufficient-scope")


async def test_a_process_without_clickhouse_answers_503(world: World, redis: Redis) -> None:
    """`tally api` beside `tally aggregator` on chDB: never opens the path itself."""
    settings = world.settings
    async with AsyncConnectionPool(settings.database_url, open=False) as pool:
        auth = Authenticator(settings, redis, pool)
        analytics = Analytics(settings, auth, None, settings.clickhouse_database)
        app = http_app([Component("api", [analytics_router(analytics)])])
        transport = httpx.ASGITransport(app, client=(random_address(), 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            reply = await client.post(SQL_PATH, json={"sql": "SELECT 1"}, headers=ADMIN)
            anonymous = await client.post(SQL_PATH, json={"sql": "SELECT 1"})
    assert reply.status_code == 503 and reply.json()["type"].endswith("/analytics-unavailable")
    assert "tally up" in reply.json()["detail"]
    assert anonymous.status_code == 401  # credentials first


async def test_bad_request_fields(world: World) -> None:
    reply = await world.client.post(
        SQL_PATH, json={"sql": "SELECT 1", "format": "xml"}, headers=ADMIN
    )
    assert reply.status_code == 422 and "format" in reply.text


@contextmanager
def runner_for(world: World, **limits: Any) -> Iterator[Runner]:
    """A runner on a reader of its own (closed after), with ``limits`` over the usual."""
    runner = Runner(lambda: world.ch.reader(reader_settings(world.settings) | limits))
    try:
        yield runner
    finally:
        runner.close()


def raw(sql: str) -> Guarded:
    return Guarded(sql, {}, 100, 101)


async def test_the_connection_itself_refuses_writes_and_settings(world: World) -> None:
    """What the guard never passes, handed to the runner directly: ClickHouse refuses."""
    table = f"{world.ch.database}.events"
    smuggled = [
        f"INSERT INTO {table} (customer, type, source, id, time, value, received_at)"
        f" SELECT 'x', 't', 's', 'i', now64(6), 1, now64(6)",
        f"ALTER TABLE {table} DELETE WHERE 1",
        f"DROP TABLE {table}",
        "SELECT 1 SETTINGS max_execution_time = 0",
        "SET readonly = 0",
    ]
    with runner_for(world) as runner:
        for sql in smuggled:
            with pytest.raises(Problem) as refused:
                await runner.run(raw(sql))
            assert refused.value.extra["reason"] == "readonly", (sql, refused.value.detail)
        # The owner's session writes on, and the reader sees what it wrote.
        await ClickHouseSink(world.ch).write(events("late", 1))
        seen = await runner.run(raw(f"SELECT count() FROM {table} WHERE customer = 'late'"))
    assert seen.rows == [[1]]


async def test_rows_read_limit(world: World) -> None:
    guarded = guard("SELECT count() FROM events", {}, None, world.ch.database, 100, 1000)
    with runner_for(world, max_rows_to_read=10) as runner, pytest.raises(Problem) as refused:
        await runner.run(guarded)
    assert refused.value.extra["limit"] == "rows-read"


async def test_memory_limit(world: World) -> None:
    sql = "SELECT length(groupArray(repeat('x', 10000))) FROM events AS a, events AS b"
    guarded = guard(sql, {}, None, world.ch.database, 100, 1000)
    with runner_for(world, max_memory_usage=8 << 20) as runner, pytest.raises(Problem) as refused:
        await runner.run(guarded)
    assert refused.value.extra["limit"] == "memory", refused.value.detail


async def test_every_function_of_a_denied_category_is_denied(world: World) -> None:
    """An engine upgrade that adds a dictionary, AI or introspection function fails here."""
    rows = world.ch.query(
        "SELECT name FROM system.functions WHERE categories IN {c:Array(String)}"
        " OR lower(alias_to) IN {d:Array(String)}",
        {"c": list(functions.DENIED_CATEGORIES), "d": sorted(functions.DENIED)},
    )
    names = [name for [name] in rows]
    assert len(names) > 100
    assert [n for n in names if not functions.denied(n)] == []
    for name in names:
        with pytest.raises(Refused):
            guard(f"SELECT {name}(1)", {}, "x", "tally", 100, 1000)


async def test_revenue_by_plan_from_the_billing_runs_copy(
    world: World, pool: AsyncConnectionPool, tenant: str
) -> None:
    """Billing copies every invoice it stores; a recomputed draft replaces its lines."""
    starter, pro = f"{tenant}-starter", f"{tenant}-pro"
    since, march = at("2025-01-10"), date(2025, 3, 1)
    await subscribe(pool, starter, "starter", since)
    await subscribe(pool, pro, "pro", since)
    await record_usage(pool, starter, "api_calls", date(2025, 3, 3), 40_000)
    await record_usage(pool, pro, "api_calls", date(2025, 3, 3), 600_000)
    mirror = InvoiceMirror(lambda: world.ch)
    run = BillingRun(pool, lambda: world.ch, timedelta(hours=24), mirror=mirror)
    sql = (
        "SELECT plan, sum(amount) AS revenue FROM invoice_lines WHERE customer IN"
        " {cs:Array(String)} AND period = '2025-03' AND status = {status:String}"
        " GROUP BY plan ORDER BY plan"
    )
    params: dict[str, Any] = {"cs": [starter, pro]}

    await run.run(march, now=at("2025-04-01"))  # within the grace: drafts

    def revenue(rows: list[list[Any]]) -> list[tuple[str, Decimal]]:
        return [(plan, Decimal(amount)) for plan, amount in rows]

    drafts = await world.rows(sql, params=params | {"status": "draft"})
    assert revenue(drafts) == [("pro", D("249")), ("starter", D("49"))]  # 100k x .0005 = 50

    await record_usage(pool, starter, "api_calls", date(2025, 3, 4), 25_000)  # late usage
    await record_usage(pool, pro, "api_calls", date(2025, 3, 4), 12_345)
    await run.run(march, now=at("2025-04-05"), finalize=True)
    assert await world.rows(sql, params=params | {"status": "draft"}) == []
    final = await world.rows(sql, params=params | {"status": "finalized"})
    assert revenue(final) == [("pro", D("255.17")), ("starter", D("64"))]
    # a customer's key reads only its own invoices' lines, whatever it names
    assert await world.rows(sql, world.key_a, params=params | {"status": "finalized"}) == []


def example_queries() -> list[tuple[str, str]]:
    """The ```sql blocks of docs/analytics.md's examples, by their heading."""
    text = DOCS.read_text().split("## Example queries", 1)[1]
    found = re.findall(r"### (.+?)\n.*?```sql\n(.*?)```", text, re.S)
    return [(title.strip(), sql.strip()) for title, sql in found]


def test_the_docs_have_the_examples() -> None:
    titles = " ".join(t.lower() for t, _ in example_queries())
    for topic in ("top endpoints", "daily active users", "p95", "daily usage", "revenue by plan"):
        assert topic in titles


@pytest.mark.parametrize(("title", "sql"), example_queries())
async def test_each_documented_example_runs(world: World, title: str, sql: str) -> None:
    params = {"days": 30, "meter_type": "api_call", "top": 5, "since": "2025-01"}
    for key in (None, world.key_a):
        reply = await world.sql(sql, key, params=params)
        assert reply.status_code == 200, (title, reply.text)
    if "invoice_lines" not in sql:  # the test's customers have no closed period
        assert await world.rows(sql, world.key_a, params=params), title


async def test_the_owners_session_reports_a_refused_query_as_clickhouse_error(
    world: World,
) -> None:
    """chDB raises its own error types; callers catch one, whichever engine answers, and
    the session answers the next query cleanly."""
    with pytest.raises(ClickHouseError, match="TIMEOUT_EXCEEDED"):
        world.ch.query("SELECT count() FROM numbers(100000000000) SETTINGS max_execution_time=0.2")
    assert world.ch.query("SELECT 1") == [[1]]
