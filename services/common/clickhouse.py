"""ClickHouse behind one small interface: chDB in-process, or a server via clickhouse-connect.

The same SQL runs on both.  Parameters use ClickHouse's own ``{name:Type}`` binding;
rows travel as JSONEachRow in and JSONCompactEachRow out, with decimals quoted, so that
no value passes through a float on either path.  Calls block: async callers wrap them
in ``asyncio.to_thread``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import jiter

from services.common.settings import Settings

DDL = Path(__file__).resolve().parents[2] / "infra" / "clickhouse"
_READ_SETTINGS = {
    "output_format_json_quote_decimals": 1,
    "output_format_json_quote_64bit_integers": 0,
    # Under FINAL, a skip index may drop the granule holding the row that supersedes
    # another, and the superseded row is then counted (seen on chDB 26.9 without the
    # exact mode). Correct first: FINAL queries prune by the primary key only.
    "use_skip_indexes_if_final": 0,
}
_INSERT_SETTINGS = {"date_time_input_format": "best_effort"}


class ClickHouse(Protocol):
    database: str

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[list[Any]]:
        """Rows as lists of JSON values; decimals come back as strings."""
        ...

    def insert(self, table: str, columns: Sequence[str], rows: bytes) -> None:
        """Insert JSONEachRow ``rows`` (objects one per line, or a JSON array of them)."""
        ...

    def close(self) -> None: ...

    def reader(self, settings: Mapping[str, str | int | float]) -> Reader:
        """A read-only connection to the same data with ``settings`` fixed for good."""
        ...


class Reader(Protocol):
    """A connection for other people's queries: opened with ``readonly=1`` and its
    limits in its settings, so ClickHouse itself refuses a write, a ``SET`` or a
    ``SETTINGS`` clause that would lift them, whatever SQL reaches it."""

    def select(self, sql: str, params: Mapping[str, Any], fmt: str) -> bytes:
        """The raw output of ``sql`` in format ``fmt``; ``ClickHouseError`` if refused."""
        ...

    def close(self) -> None: ...


def _parse_rows(raw: bytes) -> list[list[Any]]:
    return [jiter.from_json(line) for line in raw.splitlines() if line]


def _settings_clause(settings: Mapping[str, Any]) -> str:
    return " SETTINGS " + ", ".join(f"{k}={v!r}" for k, v in settings.items())


class ChdbClickHouse:
    """chDB: the ClickHouse engine in this process. One process may open a path at a time."""

    def __init__(self, path: Path, database: str) -> None:
        from chdb import session  # imported lazily: it loads a large shared library

        path.mkdir(parents=True, exist_ok=True)
        self.database = database
        self.path = path
        self._session = session.Session(str(path))  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()

    def _run(self, sql: str, fmt: str, params: Mapping[str, Any] | None) -> bytes:
        from chdb import ChdbError

        with self._lock:
            try:
                result = self._session.query(sql, fmt, params=_chdb_params(params))  # type: ignore[no-untyped-call]
            except (ChdbError, RuntimeError) as exc:  # chDB has two ChdbErrors, one a RuntimeError
                raise ClickHouseError(str(exc)) from None
        error = getattr(result, "error_message", lambda: "")()
        if error:
            raise ClickHouseError(error)
        return bytes(result.bytes())

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, "CSV", params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[list[Any]]:
        return _parse_rows(
            self._run(sql + _settings_clause(_READ_SETTINGS), "JSONCompactEachRow", params)
        )

    def insert(self, table: str, columns: Sequence[str], rows: bytes) -> None:
        if not rows:
            return
        head = (
            f"INSERT INTO {table} ({', '.join(columns)})"
            f"{_settings_clause(_INSERT_SETTINGS)} FORMAT JSONEachRow\n"
        )
        self._run(head + rows.decode(), "CSV", None)

    def close(self) -> None:
        with self._lock:
            self._session.close()  # type: ignore[no-untyped-call]

    def reader(self, settings: Mapping[str, str | int | float]) -> Reader:
        return ChdbReader(self.path, settings)


class ChdbReader:
    """A second chDB connection to the path this process already holds.

    Its settings ride in the connection string, which chDB applies to this connection's
    session alone: the owner's session keeps writing, and runs alongside (a long read
    here holds this connection's lock, not the owner's).
    """

    def __init__(self, path: Path, settings: Mapping[str, str | int | float]) -> None:
        self._url = f"{path}?{urlencode({'readonly': 1, **settings})}"
        self._conn = self._connect()
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        import chdb

        return chdb.connect(self._url)  # type: ignore[no-untyped-call]

    def select(self, sql: str, params: Mapping[str, Any], fmt: str) -> bytes:
        with self._lock:
            try:
                result = self._conn.query(sql, fmt, params=_chdb_params(params))
            except RuntimeError as exc:  # chDB's ChdbError
                # A query stopped by an error leaves its partial output in the
                # connection, and chDB 4.4 prepends it to the next query's (seen after
                # a timeout): a fresh connection starts clean.
                self._conn.close()
                self._conn = self._connect()
                raise ClickHouseError(str(exc)) from None
        return bytes(result.bytes())

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _chdb_params(params: Mapping[str, Any] | None) -> dict[str, str]:
    """chDB takes parameter values as text in ClickHouse's escaped form."""
    return {k: _chdb_literal(v) for k, v in (params or {}).items()}


def _chdb_literal(value: Any, nested: bool = False) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_chdb_literal(v, nested=True) for v in value) + "]"
    text = str(value)
    if not nested:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ServerClickHouse:
    """A ClickHouse server over HTTP (clickhouse-connect)."""

    def __init__(self, url: str, database: str, connect_timeout: float = 2.0) -> None:
        import clickhouse_connect

        self.database = database
        with _reachable():
            self._client = clickhouse_connect.get_client(
                dsn=url, autogenerate_session_id=False, connect_timeout=connect_timeout
            )

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        with _reachable():
            self._client.command(sql, parameters=dict(params or {}))

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[list[Any]]:
        with _reachable():
            raw = self._client.raw_query(
                sql,
                parameters=dict(params or {}),
                settings=_READ_SETTINGS,
                fmt="JSONCompactEachRow",
            )
        return _parse_rows(raw)

    def insert(self, table: str, columns: Sequence[str], rows: bytes) -> None:
        if rows:
            with _reachable():
                self._client.raw_insert(
                    table,
                    list(columns),
                    insert_block=rows,
                    settings=_INSERT_SETTINGS,
                    fmt="JSONEachRow",
                )

    def close(self) -> None:
        self._client.close()

    def reader(self, settings: Mapping[str, str | int | float]) -> Reader:
        return ServerReader(self._client, settings)


class ServerReader:
    """Queries through the server client with ``readonly=1`` and the limits sent as
    settings of every request (the HTTP interface applies them before the query runs)."""

    def __init__(self, client: Any, settings: Mapping[str, str | int | float]) -> None:
        self._client = client
        self._settings = {"readonly": 1, **settings}

    def select(self, sql: str, params: Mapping[str, Any], fmt: str) -> bytes:
        from clickhouse_connect.driver.exceptions import DatabaseError

        try:
            with _reachable():
                raw = self._client.raw_query(
                    sql, parameters=dict(params), settings=self._settings, fmt=fmt
                )
        except DatabaseError as exc:
            raise ClickHouseError(str(exc)) from None
        return bytes(raw)

    def close(self) -> None:
        """The client belongs to the ``ServerClickHouse`` it came from."""


class ClickHouseError(RuntimeError):
    pass


class ClickHouseUnavailable(ClickHouseError):
    """The ClickHouse server cannot be reached or did not answer: a request that needs
    it is answered 503, unlike a query ClickHouse refused."""


@contextmanager
def _reachable() -> Iterator[None]:
    """clickhouse-connect's ``OperationalError`` (the HTTP exchange failed) as
    ``ClickHouseUnavailable``, so callers need not know the client library."""
    from clickhouse_connect.driver.exceptions import OperationalError

    try:
        yield
    except OperationalError as exc:
        raise ClickHouseUnavailable(str(exc)) from exc


def connect(settings: Settings) -> ClickHouse:
    if settings.clickhouse_url:
        return ServerClickHouse(
            settings.clickhouse_url,
            settings.clickhouse_database,
            settings.clickhouse_connect_timeout,
        )
    return ChdbClickHouse(settings.chdb_path, settings.clickhouse_database)


EVENTS_SORTING_KEY = "customer, source, id"


def create_schema(client: ClickHouse) -> None:
    """Create the database and apply every DDL file in ``infra/clickhouse`` (idempotent),
    the tables first, then the views in ``views/`` that read them.

    ``CREATE TABLE IF NOT EXISTS`` leaves an older table as it is, so check that the
    events table has the key exactly-once depends on, rather than silently run on another
    (before the views, which would fail on another layout with a less helpful error).
    """
    client.command(f"CREATE DATABASE IF NOT EXISTS {client.database}")
    for ddl in sorted(DDL.glob("*.sql")):
        client.command(ddl.read_text().replace("{database}", client.database))
    _check_events(client)
    for ddl in sorted((DDL / "views").glob("*.sql")):
        client.command(ddl.read_text().replace("{database}", client.database))


def _check_events(client: ClickHouse) -> None:
    [[key, engine]] = client.query(
        "SELECT sorting_key, engine_full FROM system.tables"
        " WHERE database = {db:String} AND name = 'events'",
        {"db": client.database},
    )
    if key != EVENTS_SORTING_KEY or "ReplacingMergeTree(first_seen)" not in engine:
        raise ClickHouseError(
            f"{client.database}.events has key ({key}) and engine {engine!r}; this Tally needs"
            f" ReplacingMergeTree(first_seen) ordered by ({EVENTS_SORTING_KEY}): migrate the"
            " table (create the new one, INSERT SELECT, EXCHANGE TABLES)"
        )
