"""The analytics SQL guard: what it accepts, what it refuses and the reason it names, and
that every table of what it lets through carries the tenant filter."""

from __future__ import annotations

from typing import Any

import pytest
import sqlglot
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlglot import exp

from services.api.analytics.guard import MAX_SQL_CHARS, TABLES, TENANT, Guarded, Refused, guard

DB = "tally"
VIEWS = {f"{DB}.{view}" for view in TABLES.values()}


def run(sql: str, params: dict[str, Any] | None = None, tenant: str | None = "acme") -> Guarded:
    return guard(sql, params or {}, tenant, DB, default_rows=100, max_rows=50_000)


REFUSED = [
    ("INSERT INTO events SELECT * FROM events", "not-select"),
    ("ALTER TABLE events DELETE WHERE 1", "not-select"),
    ("DROP TABLE events", "not-select"),
    ("CREATE TABLE x (a Int8) ENGINE = Memory", "not-select"),
    ("OPTIMIZE TABLE events FINAL", "not-select"),
    ("SYSTEM FLUSH LOGS", "not-select"),
    ("KILL QUERY WHERE 1", "not-select"),
    ("SET readonly = 0", "not-select"),
    ("DESCRIBE events", "not-select"),
    ("SELECT 1 SETTINGS readonly = 0", "settings"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_execution_time = 0)", "settings"),
    ("SELECT 1 FORMAT JSON", "format"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", "into-outfile"),
    ("SELECT 1; SELECT 2", "statements"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table-function"),
    ("SELECT * FROM url('http://x')", "table-function"),
    ("SELECT * FROM s3('http://x')", "table-function"),
    ("SELECT * FROM remote('h', system.one)", "table-function"),
    ("SELECT * FROM numbers(10)", "table-function"),
    ("SELECT * FROM executable('x', 'CSV', 'a Int8')", "table-function"),
    ("SELECT * FROM Python(df)", "table-function"),
    ("SELECT * FROM postgresql('h', 'd', 't', 'u', 'p')", "table-function"),
    ("SELECT * FROM mysql('h', 'd', 't', 'u', 'p')", "table-function"),
    ("SELECT * FROM cluster('c', system.one)", "table-function"),
    ("SELECT * FROM merge('tally', '.*')", "table-function"),
    ("SELECT * FROM events JOIN numbers(3) AS n ON 1", "table-function"),
    ("SELECT * FROM system.tables", "system-table"),
    ('SELECT * FROM "system"."tables"', "system-table"),
    ("SELECT * FROM `system`.`tables`", "system-table"),
    ("SELECT * FROM SYSTEM.TABLES", "system-table"),
    ("SELECT * FROM information_schema.tables", "system-table"),
    ("SELECT * FROM INFORMATION_SCHEMA.TABLES", "system-table"),
    ("SELECT * FROM tally.events", "qualified-table"),
    ("SELECT * FROM default.events", "qualified-table"),
    ("SELECT * FROM secrets", "unknown-table"),
    ("SELECT * FROM Events", "unknown-table"),
    ("SELECT * FROM events WHERE id IN (SELECT id FROM analytics_events)", "unknown-table"),
    ("WITH events AS (SELECT 1) SELECT * FROM events", "cte-shadows-table"),
    ("WITH daily_usage AS (SELECT * FROM events) SELECT 1", "cte-shadows-table"),
    ("WITH 1 AS events SELECT * FROM events", "cte-shadows-table"),
    ("SELECT (WITH t AS (SELECT 1) SELECT 1), * FROM t", "unknown-table"),
    ("WITH invoices AS (SELECT * FROM invoices) SELECT * FROM invoices", "unknown-table"),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", "unknown-table"),
    ("WITH x AS (SELECT * FROM analytics_events) SELECT * FROM x", "unknown-table"),
    ("SELECT * FROM events WHERE customer IN system.tables", "in-table"),
    ("SELECT * FROM events WHERE customer GLOBAL IN daily_usage", "in-table"),
    ("SELECT * FROM events WHERE customer NOT IN (daily_usage)", "in-table"),
    ("SELECT dictGet('d', 'a', 1)", "function"),
    ("SELECT dictGetString('d', 'a', 1) FROM events", "function"),
    ("SELECT joinGet('j', 'v', 1)", "function"),
    ("SELECT file('/etc/hostname')", "function"),
    ("SELECT hasColumnInTable('system', 'tables', 'name')", "function"),
    ("SELECT getSetting('max_execution_time')", "function"),
    ("SELECT sleep(3)", "function"),
    ("SELECT HOSTNAME()", "function"),
    ("SELECT current_user()", "function"),
    ("SELECT aiGenerate('x')", "function"),
    ("SELECT * FROM events SAMPLE 0.1", "sample"),
    ("SELECT {__tenant:String}", "reserved-parameter"),
    ("SELECT {n:UInt32}", "parameter"),
    ("SELECT count() FROM events WHERE customer IN {t:Identifier}", "parameter"),
    ("SELECT * FROM {t:Identifier}", "parameter"),
    ("SELECT {c:identifier} FROM events", "parameter"),
    ("SELEC 1", "not-select"),
    ("SELECT * FROM events WHERE", "syntax"),
    ("", "syntax"),
    ("SELECT 1 /*" + "x" * MAX_SQL_CHARS + "*/", "too-long"),
]


@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_refuses_naming_the_reason(sql: str, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        run(sql)
    assert refused.value.reason == reason, refused.value.detail
    assert refused.value.detail


def test_parse_errors_are_invalid_sql_and_the_rest_not_allowed() -> None:
    with pytest.raises(Refused) as unreadable:
        run("SELECT * FROM events WHERE")
    with pytest.raises(Refused) as forbidden:
        run("SELECT * FROM system.tables")
    assert unreadable.value.invalid and not forbidden.value.invalid


@pytest.mark.parametrize("name", ["__tenant", "__x"])
def test_reserved_parameter_names_in_params(name: str) -> None:
    with pytest.raises(Refused) as refused:
        run("SELECT 1", {name: "other"})
    assert refused.value.reason == "reserved-parameter"


def test_bad_parameter_names() -> None:
    with pytest.raises(Refused) as refused:
        run("SELECT 1", {"a-b": 1})
    assert refused.value.reason == "parameter"


ACCEPTED = [
    "SELECT count() FROM events",
    "SELECT count() FROM events FINAL",
    "SELECT type, sum(value) FROM events WHERE value > {min:UInt32} GROUP BY type",
    "SELECT * FROM events AS e JOIN daily_usage AS d ON e.customer = d.customer",
    "SELECT * FROM events UNION ALL SELECT * FROM events",
    "WITH t AS (SELECT * FROM events) SELECT * FROM t",
    "WITH a AS (SELECT * FROM events), b AS (SELECT * FROM a) SELECT * FROM b JOIN a USING id",
    "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "WITH (SELECT max(value) FROM events) AS m SELECT m",
    "SELECT * FROM events WHERE customer IN (SELECT customer FROM daily_usage)",
    "SELECT * FROM events WHERE id IN {ids:Array(String)}",
    "SELECT arrayJoin(mapKeys(dimensions)) AS k, count() FROM events GROUP BY k",
    "SELECT quantile(0.95)(value), uniqExact(dimensions['user']) FROM events",
    "SELECT * FROM events -- SETTINGS readonly = 0",
    "SELECT /* system.tables */ count() FROM events",
]


@pytest.mark.parametrize("sql", ACCEPTED)
def test_accepts_and_binds_every_table(sql: str) -> None:
    guarded = run(sql, {"min": 1, "ids": ["a"]})
    assert guarded.params[TENANT] == "acme"
    assert_tenant_bound(guarded.sql)


def test_comments_are_not_forwarded() -> None:
    sql = "SELECT count() -- */ FROM system.tables --\nFROM events /* x */"
    assert "system" not in run(sql).sql and "/*" not in run(sql).sql


def test_the_admin_reads_the_views_unfiltered() -> None:
    guarded = run("SELECT count() FROM events", tenant=None)
    assert TENANT not in guarded.params
    tree = sqlglot.parse_one(guarded.sql, read="clickhouse")
    tables = {table_name(t) for t in tree.find_all(exp.Table)}
    assert tables == {f"{DB}.analytics_events"}


@pytest.mark.parametrize(
    ("sql", "rows", "fetch"),
    [
        ("SELECT * FROM events", 100, 101),
        ("SELECT * FROM events LIMIT 10", 10, 10),
        ("SELECT * FROM events LIMIT 10 OFFSET 5", 10, 10),
        ("SELECT * FROM events LIMIT 60000", 50_000, 50_001),
        ("SELECT * FROM events LIMIT {n:UInt32}", 50_000, 50_001),
        ("SELECT * FROM events LIMIT 1 BY type", 100, 101),
        ("SELECT 1 UNION ALL SELECT 2", 100, 101),
    ],
)
def test_limits(sql: str, rows: int, fetch: int) -> None:
    guarded = run(sql, {"n": 5})
    assert (guarded.rows, guarded.fetch) == (rows, fetch)
    tree = sqlglot.parse_one(guarded.sql, read="clickhouse")
    outer = tree.args["limit"].expression
    assert int(outer.name) == fetch or fetch == rows


def table_name(table: exp.Table) -> str:
    return ".".join(p.name for p in table.parts)


def assert_tenant_bound(sql: str) -> None:
    """Every table in ``sql`` is a view read only inside ``(SELECT * FROM view WHERE
    customer = {__tenant:String})``."""
    tree = sqlglot.parse_one(sql, read="clickhouse")
    tables = list(tree.find_all(exp.Table))
    ctes = {c.alias_or_name for c in tree.find_all(exp.CTE)}
    for table in tables:
        if table_name(table) in ctes:
            continue
        assert table_name(table) in VIEWS, sql
        assert isinstance(table.parent, exp.From), sql
        select = table.parent.parent
        assert isinstance(select, exp.Select) and isinstance(select.parent, exp.Subquery), sql
        where = select.args["where"].this
        assert isinstance(where, exp.EQ), sql
        assert where.this.name == "customer", sql
        assert isinstance(where.expression, exp.Placeholder), sql
        assert where.expression.name == TENANT, sql


# Random compositions of allowed clauses: whatever the shape, every table is bound.
table = st.sampled_from(sorted(TABLES))
alias = st.sampled_from(["", " AS a", " AS b", " AS events", " AS t"])
condition = st.sampled_from(
    [
        "1",
        "customer = 'other'",
        "customer != ''",
        "customer IN (SELECT customer FROM events)",
        "customer IN (SELECT customer FROM daily_usage WHERE value > 0)",
        "EXISTS (SELECT 1 FROM events)",
        "customer = (SELECT any(customer) FROM daily_usage)",
    ]
)


@st.composite
def queries(draw: st.DrawFn, depth: int = 0) -> str:
    kinds = ["plain", "join", "union", "sub", "cte"] if depth < 2 else ["plain"]
    kind = draw(st.sampled_from(kinds))
    where = f" WHERE {draw(condition)}"
    if kind == "plain":
        return f"SELECT * FROM {draw(table)}{draw(alias)}{where}"
    if kind == "join":
        left, right = draw(table), draw(table)
        return f"SELECT * FROM {left} AS l JOIN {right} AS r ON l.customer = r.customer{where}"
    if kind == "union":
        return f"{draw(queries(depth + 1))} UNION ALL {draw(queries(depth + 1))}"
    if kind == "sub":
        return f"SELECT * FROM ({draw(queries(depth + 1))}) AS s{where}"
    return f"WITH c AS ({draw(queries(depth + 1))}) SELECT * FROM c{where}"


@settings(max_examples=150, deadline=None)
@given(queries())
def test_every_table_of_any_composition_carries_the_tenant_filter(sql: str) -> None:
    assert_tenant_bound(run(sql).sql)
