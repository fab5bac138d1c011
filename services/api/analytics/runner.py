"""Running guarded SQL: on a read-only connection whose limits ClickHouse enforces.

The connection (``ClickHouse.reader``) is opened with ``readonly=1`` and the limits of
``TALLY_ANALYTICS_*`` as its own settings, so no query can raise them: under
``readonly=1`` ClickHouse refuses ``SET``, a ``SETTINGS`` clause and every write itself
(checked by a test that hands the runner an INSERT directly).  On chDB it is a second
connection to the engine this process already holds, with its own lock: a long query
does not hold up the aggregator's inserts.

A ClickHouse refusal becomes a problem naming its cause: a limit (422
``sql-limit-exceeded``, ``limit`` says which), a write or setting the connection refused
(400 ``sql-not-allowed``), else the query as written (400 ``sql-invalid``, with
ClickHouse's own message).
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.problem_types import SQL_INVALID, SQL_LIMIT_EXCEEDED, SQL_NOT_ALLOWED
from services.api.analytics.guard import Guarded
from services.common.clickhouse import ClickHouseError, ClickHouseUnavailable, Reader
from services.common.problems import Problem
from services.common.settings import Settings

_CODE = re.compile(r"Code: (\d+)\.")
_NOISE = re.compile(r"^(?:Code: \d+\. )+(?:DB::Exception: )+|(?:\s*\(version [^)]*\))+\.?$")
# ClickHouse error codes of the limits, by the name a client sees and its setting.
_LIMITS: dict[int, tuple[str, str]] = {
    159: ("time", "TALLY_ANALYTICS_MAX_EXECUTION_SECONDS"),  # TIMEOUT_EXCEEDED
    160: ("time", "TALLY_ANALYTICS_MAX_EXECUTION_SECONDS"),  # TOO_SLOW
    158: ("rows-read", "TALLY_ANALYTICS_MAX_ROWS_TO_READ"),  # TOO_MANY_ROWS
    307: ("rows-read", "TALLY_ANALYTICS_MAX_ROWS_TO_READ"),  # TOO_MANY_BYTES
    241: ("memory", "TALLY_ANALYTICS_MAX_MEMORY_BYTES"),  # MEMORY_LIMIT_EXCEEDED
    396: ("result", "TALLY_ANALYTICS_MAX_ROWS"),  # TOO_MANY_ROWS_OR_BYTES
    167: ("complexity", "max_ast_depth"),  # TOO_DEEP_AST
    168: ("complexity", "max_ast_elements"),  # TOO_BIG_AST
}
_READONLY = {164, 497}  # READONLY, ACCESS_DENIED


def reader_settings(settings: Settings) -> dict[str, str | int | float]:
    """The connection's fixed settings: the limits, and JSON that keeps decimals exact."""
    return {
        "max_execution_time": settings.analytics_max_execution_seconds,
        "max_rows_to_read": settings.analytics_max_rows_to_read,
        "max_memory_usage": settings.analytics_max_memory_bytes,
        # The guard's LIMIT tells truncation exactly; this is the backstop for a result
        # its LIMIT did not bound (``break``: a partial result, not an error).
        "max_result_rows": settings.analytics_max_rows + 1,
        "result_overflow_mode": "break",
        "output_format_json_quote_decimals": 1,
        "output_format_json_quote_64bit_integers": 0,
        "use_skip_indexes_if_final": 0,  # as services.common.clickhouse reads, exact
    }


@dataclass(frozen=True, slots=True)
class Result:
    columns: list[dict[str, str]]  # [{name, type}]
    rows: list[list[Any]]
    rows_read: int | None
    elapsed_ms: float
    truncated: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "rows": self.rows,
            "rows_read": self.rows_read,
            "elapsed_ms": self.elapsed_ms,
            "truncated": self.truncated,
        }

    def as_csv(self) -> str:
        """RFC 4180 with a header row; arrays, maps and tuples as JSON."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow([c["name"] for c in self.columns])
        writer.writerows([_cell(v) for v in row] for row in self.rows)
        return out.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    if value is None:
        return ""
    return value


class Runner:
    """Runs guarded SQL on a reader it opens on first use: an api that starts while a
    ClickHouse server is down serves everything else, and a query then answers 503."""

    def __init__(self, open_reader: Callable[[], Reader]) -> None:
        self._open = open_reader
        self._reader: Reader | None = None
        self._opening = threading.Lock()

    def _select(self, sql: str, params: Mapping[str, Any]) -> bytes:
        with self._opening:
            if self._reader is None:
                self._reader = self._open()
            reader = self._reader
        return reader.select(sql, params, "JSONCompact")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    async def run(self, guarded: Guarded) -> Result:
        """Run ``guarded`` (chDB blocks: in a thread) and keep at most ``guarded.rows``."""
        try:
            raw = await asyncio.to_thread(self._select, guarded.sql, guarded.params)
        except ClickHouseUnavailable:
            raise
        except ClickHouseError as exc:
            raise refusal(str(exc)) from None
        body = orjson.loads(raw)
        data: list[list[Any]] = body["data"]
        stats = body.get("statistics", {})
        return Result(
            columns=[{"name": m["name"], "type": m["type"]} for m in body["meta"]],
            rows=data[: guarded.rows],
            rows_read=stats.get("rows_read"),
            elapsed_ms=round(float(stats.get("elapsed", 0.0)) * 1000, 3),
            truncated=len(data) > guarded.rows,
        )


def refusal(message: str) -> Problem:
    """The problem for ClickHouse's refusal ``message``."""
    found = _CODE.search(message)
    code = int(found[1]) if found else 0
    said = _NOISE.sub("", message.strip().splitlines()[0] if message.strip() else message)
    if code in _LIMITS:
        limit, setting = _LIMITS[code]
        return Problem(
            SQL_LIMIT_EXCEEDED,
            f"the query went over the {limit} limit ({setting}): {said}",
            reason="limit",
            limit=limit,
        )
    if code in _READONLY:
        return Problem(
            SQL_NOT_ALLOWED,
            f"ClickHouse refused it as a read-only query: {said}",
            reason="readonly",
        )
    return Problem(SQL_INVALID, f"ClickHouse refused the query: {said}", reason="clickhouse")
