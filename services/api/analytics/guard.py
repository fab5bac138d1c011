"""The analytics SQL guard: one SELECT over Tally's exposed tables, bound to a tenant.

User SQL is parsed with sqlglot's ClickHouse dialect, checked, and *rewritten*; the
rewritten SQL is what runs.  Every reference to an exposed table becomes a subquery
that reads the view behind it with ``customer = {__tenant:String}`` (HogQL's team guard),
so a customer's query sees only its rows whatever it says: its own ``WHERE customer =
'other'`` only narrows its own rows to none.  What could reach past those subqueries is
refused by name, each with a ``reason`` a client can branch on: other statements,
``SETTINGS``/``FORMAT``/``INTO OUTFILE``, table functions, system and other databases'
tables, unknown tables, CTEs named like a table, ``IN <table>``, the functions of
``functions.DENIED``, and parameter names starting with ``__`` (Tally's own).

The guard is the first wall, not the only one: the runner's connection is
``readonly=1`` with its limits fixed, so ClickHouse itself refuses writes and settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from services.api.analytics import functions

MAX_SQL_CHARS = 20_000
"""Longer SQL is refused before parsing: a parser's time grows with its input."""

TENANT = "__tenant"
"""The parameter that carries the caller's customer id into every tenant filter."""

TABLES: dict[str, str] = {
    "events": "analytics_events",
    "daily_usage": "analytics_daily_usage",
    "invoice_lines": "analytics_invoice_lines",
}
"""Exposed name → the view behind it (``infra/clickhouse/views``)."""

OUTFILE = "INTO OUTFILE is not allowed: results come back in the response"
RESERVED = "parameter names starting with __ are Tally's"
SYSTEM_DATABASES = frozenset({"system", "information_schema"})
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STATEMENTS = {
    exp.Insert: "INSERT",
    exp.Update: "UPDATE",
    exp.Delete: "DELETE",
    exp.Alter: "ALTER",
    exp.Drop: "DROP",
    exp.Create: "CREATE",
    exp.Set: "SET",
    exp.Use: "USE",
    exp.Describe: "DESCRIBE",
}


class Refused(Exception):
    """SQL the guard will not run: ``reason`` is a stable slug, ``detail`` says what."""

    def __init__(self, reason: str, detail: str, invalid: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.invalid = invalid  # unreadable SQL, rather than readable SQL not allowed


@dataclass(frozen=True, slots=True)
class Guarded:
    """What runs: the rewritten SQL, its parameters, and how many rows to return.

    ``fetch`` is one more than ``rows`` when Tally chose the limit (none given, or one
    above the cap): a row beyond ``rows`` then means the result was truncated.
    """

    sql: str
    params: dict[str, Any]
    rows: int
    fetch: int


def guard(
    sql: str,
    params: Mapping[str, Any],
    tenant: str | None,
    database: str,
    default_rows: int,
    max_rows: int,
) -> Guarded:
    """Check ``sql`` and rewrite it for ``tenant`` (``None``: every customer's rows)."""
    _check_params(params)
    root = _parse(sql)
    _check_placeholders(root, params)
    _check_tree(root)
    _bind_tables(root, tenant, database)
    root, rows, fetch = _limit(root, default_rows, max_rows)
    bound = dict(params) | ({TENANT: tenant} if tenant is not None else {})
    # Comments are not forwarded: what runs is exactly the tree that was checked.
    return Guarded(root.sql(dialect="clickhouse", comments=False), bound, rows, fetch)


def _parse(sql: str) -> exp.Query:
    if len(sql) > MAX_SQL_CHARS:
        raise Refused("too-long", f"the SQL is {len(sql)} characters; at most {MAX_SQL_CHARS}")
    try:
        statements = [s for s in sqlglot.parse(sql, read="clickhouse") if s is not None]
    except (ParseError, TokenError) as exc:
        first = sql.lstrip(" \t\r\n(").split(maxsplit=1)[:1]
        if first and first[0].upper() not in ("SELECT", "WITH"):
            raise Refused(
                "not-select", f"only SELECT is allowed; found {first[0].upper()}"
            ) from None
        if re.search(r"\bINTO\s+OUTFILE\b", sql, re.IGNORECASE):
            raise Refused(
                "into-outfile", "INTO OUTFILE is not allowed: results come back in the response"
            ) from None
        raise Refused(
            "syntax", f"the SQL does not parse: {_first_line(exc)}", invalid=True
        ) from None
    if not statements:
        raise Refused("syntax", "the SQL is empty", invalid=True)
    if len(statements) > 1:
        raise Refused("statements", f"one statement only; found {len(statements)}")
    root = statements[0]
    if not isinstance(root, exp.Query) or isinstance(root, exp.Subquery):
        raise Refused("not-select", f"only SELECT is allowed; found {_statement(root)}")
    return root


def _statement(node: exp.Expr) -> str:
    for kind, name in _STATEMENTS.items():
        if isinstance(node, kind):
            return name
    if isinstance(node, exp.Command):
        return str(node.this).upper()
    return type(node).__name__.upper()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0]


def _check_tree(root: exp.Expr) -> None:
    for node in root.walk():
        if isinstance(node, exp.Query) and not isinstance(node, exp.Subquery):
            if node.args.get("settings"):
                raise Refused("settings", "SETTINGS is not allowed: Tally sets the limits")
            if node.args.get("format"):
                raise Refused("format", "FORMAT is not allowed: ask for json or csv instead")
        if isinstance(node, exp.CTE):
            _check_cte(node)
        elif isinstance(node, exp.Table):
            _check_table(node)
        elif isinstance(node, exp.In):
            _check_in(node)
        elif isinstance(node, exp.Func):
            _check_function(node)
        elif isinstance(node, exp.Command | exp.Set | exp.Insert):
            raise Refused("not-select", f"only SELECT is allowed; found {_statement(node)}")


def _check_cte(node: exp.CTE) -> None:
    if node.alias_or_name in TABLES:
        raise Refused(
            "cte-shadows-table",
            f"a WITH name may not be a table's name: {node.alias_or_name!r}",
        )


def _check_table(table: exp.Table) -> None:
    if isinstance(table.this, exp.Func):
        name = _function_name(table.this)
        raise Refused("table-function", f"table functions are not allowed: {name}()")
    database = table.args.get("db")
    if database is not None or table.args.get("catalog") is not None:
        qualified = ".".join(p.name for p in table.parts)
        if table.db.lower() in SYSTEM_DATABASES or table.catalog.lower() in SYSTEM_DATABASES:
            raise Refused("system-table", f"system tables are not allowed: {qualified}")
        raise Refused(
            "qualified-table",
            f"name tables without a database ({_known()}); found {qualified}",
        )
    if table.args.get("sample") is not None:
        raise Refused("sample", "SAMPLE is not supported: the tables have no sampling key")
    if table.name not in TABLES and _cte_scope(table) is None:
        if table.name.lower() in SYSTEM_DATABASES:
            raise Refused("system-table", f"system tables are not allowed: {table.name}")
        raise Refused("unknown-table", f"unknown table {table.name!r}; the tables are {_known()}")


def _known() -> str:
    return ", ".join(TABLES)


def _cte_scope(table: exp.Table) -> exp.CTE | None:
    """The table CTE ``table`` names, looked up as ClickHouse does: in the WITH of the
    queries around it, innermost first; inside a CTE's own body only the CTEs before
    it (itself too under WITH RECURSIVE).  A name no CTE in scope answers is a table,
    and must be an exposed one: ``WITH invoices AS (SELECT * FROM invoices)`` would
    read the raw table of the session's database."""
    node: exp.Expr | None = table.parent
    came_from: exp.Expr = table
    while node is not None:
        with_ = node.args.get("with_") if isinstance(node, exp.Query) else None
        if isinstance(with_, exp.With):
            visible = list(with_.expressions)
            if came_from is with_:  # from inside one CTE's body: those before it
                body = next(c for c in visible if c is _child_of(with_, table))
                at = visible.index(body)
                visible = visible[: at + 1 if with_.args.get("recursive") else at]
            for cte in reversed(visible):
                if not cte.args.get("scalar") and cte.alias_or_name == table.name:
                    return cte  # type: ignore[no-any-return]
        came_from, node = node, node.parent
    return None


def _child_of(parent: exp.Expr, node: exp.Expr) -> exp.Expr:
    """The child of ``parent`` that ``node`` descends from."""
    while node.parent is not parent:
        assert node.parent is not None
        node = node.parent
    return node


def _check_in(node: exp.In) -> None:
    """``x IN t`` reads table ``t`` whole: only lists, parameters and subqueries."""
    field = node.args.get("field")
    listed = node.expressions
    if isinstance(field, exp.Column | exp.Table | exp.Dot) or any(
        isinstance(e, exp.Column | exp.Table | exp.Dot) for e in listed
    ):
        raise Refused(
            "in-table",
            "IN takes a list of values, a parameter or a subquery (IN (SELECT ...)),"
            " not a table or column name",
        )


def _function_name(node: exp.Func) -> str:
    name = node.this if isinstance(node.this, str) else node.sql_name()
    return str(name)


def _check_function(node: exp.Func) -> None:
    name = _function_name(node)
    if functions.denied(name) or functions.denied(name.replace("_", "")):
        raise Refused("function", f"the function {name}() is not allowed in analytics SQL")


def _placeholders(root: exp.Expr) -> set[str]:
    return {p.name for p in root.find_all(exp.Placeholder) if p.name}


def _check_params(params: Mapping[str, Any]) -> None:
    for name in params:
        if not _PARAMETER_NAME.fullmatch(name):
            raise Refused("parameter", f"parameter names are letters, digits and _; got {name!r}")
        if name.startswith("__"):
            raise Refused(
                "reserved-parameter", f"parameter names starting with __ are Tally's: {name!r}"
            )


def _check_placeholders(root: exp.Expr, params: Mapping[str, Any]) -> None:
    """Values only: an ``Identifier`` parameter would name a table or column from
    outside the checked SQL (``x IN {t:Identifier}`` reads a table)."""
    for placeholder in root.find_all(exp.Placeholder):
        kind = placeholder.args.get("kind")
        text = kind.sql(dialect="clickhouse") if isinstance(kind, exp.Expr) else str(kind)
        if text.lower() == "identifier":
            raise Refused(
                "parameter",
                f"{{{placeholder.name}:Identifier}} is not allowed: name tables and columns"
                " in the SQL; parameters carry values",
            )
    used = _placeholders(root)
    reserved = sorted(n for n in used if n.startswith("__"))
    if reserved:
        raise Refused(
            "reserved-parameter", f"parameter names starting with __ are Tally's: {reserved[0]!r}"
        )
    missing = sorted(used - set(params))
    if missing:
        raise Refused(
            "parameter", f"no value given for the parameter(s) {', '.join(missing)} (params)"
        )


def _bind_tables(root: exp.Expr, tenant: str | None, database: str) -> None:
    """Every exposed table, as the tenant's subquery of the view behind it (the alias
    kept, or the table's own name, so ``events.value`` still resolves)."""
    found = [t for t in root.find_all(exp.Table) if t.name in TABLES and _cte_scope(t) is None]
    for table in found:
        view = exp.table_(TABLES[table.name], db=database)
        select = exp.select("*").from_(view)
        if tenant is not None:
            select = select.where(
                exp.EQ(
                    this=exp.column("customer"),
                    expression=exp.Placeholder(
                        this=exp.var(TENANT),
                        kind=exp.DataType.build("String", dialect="clickhouse"),
                    ),
                )
            )
        alias = exp.TableAlias(this=exp.to_identifier(table.alias or table.name))
        # FINAL goes: the views read the table FINAL already, and a subquery takes none.
        final = table.parent if isinstance(table.parent, exp.Final) else None
        (final or table).replace(exp.Subquery(this=select, alias=alias))


def _limit(root: exp.Query, default_rows: int, max_rows: int) -> tuple[exp.Query, int, int]:
    """Clamp the outermost LIMIT: none → ``default_rows``, above ``max_rows`` (or not a
    number) → the cap, each fetched with one more row to tell truncation; a number within
    the cap stays as it is."""
    limit = root.args.get("limit")
    by = isinstance(limit, exp.Limit) and bool(limit.expressions)  # LIMIT n BY: per group
    asked = None if by or limit is None else _number(limit)
    if asked is not None and asked <= max_rows:
        return root, asked, asked
    rows = default_rows if limit is None or by else max_rows
    if isinstance(root, exp.Select) and not by and (limit is None or asked is not None):
        return root.limit(rows + 1), rows, rows + 1
    wrapped = exp.select("*").from_(root.subquery("q")).limit(rows + 1)
    return wrapped, rows, rows + 1


def _number(limit: exp.Expr) -> int | None:
    value = limit.args.get("expression") if isinstance(limit, exp.Limit) else None
    if isinstance(value, exp.Literal) and value.is_int:
        return int(value.name)
    return None
