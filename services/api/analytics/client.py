"""``tally sql``: analytics SQL from a terminal, asked of the running Tally over HTTP.

It never opens ClickHouse itself: in ``tally up`` chDB belongs to the running process,
and over HTTP the command gets the same guard, tenant and limits as any caller.
"""

from __future__ import annotations

import sys
from typing import Any

import httpx
import orjson

from services.api.analytics.routes import PATH


class Failed(Exception):
    """The query did not run: the message says why (the problem's detail)."""


def ask(
    url: str,
    token: str,
    sql: str,
    params: dict[str, str],
    fmt: str,
    customer: str | None = None,
    timeout: float = 120.0,
) -> httpx.Response:
    body: dict[str, Any] = {
        "sql": sql,
        "params": params,
        "format": "csv" if fmt == "csv" else "json",
    }
    if customer:
        body["customer"] = customer
    try:
        reply = httpx.post(
            url.rstrip("/") + PATH,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise Failed(f"cannot reach Tally at {url}: {exc}") from None
    if reply.status_code != 200:
        raise Failed(_problem(reply))
    return reply


def _problem(reply: httpx.Response) -> str:
    try:
        problem = reply.json()
    except ValueError:
        return f"HTTP {reply.status_code}: {reply.text[:200]}"
    reason = f" ({problem['reason']})" if problem.get("reason") else ""
    return f"{problem.get('detail') or problem.get('title')}{reason}"


def parse_params(pairs: list[str]) -> dict[str, str]:
    """``name=value`` pairs; ClickHouse parses each value as its placeholder's type."""
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise Failed(f"--param takes name=value, got {pair!r}")
        found[name] = value
    return found


def render(reply: httpx.Response, fmt: str) -> str:
    if fmt == "csv":
        return reply.text
    body = reply.json()
    if fmt == "json":
        return orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()
    return table(body)


def table(body: dict[str, Any]) -> str:
    """Columns padded to their widest cell, numbers right-aligned; a last line saying
    how many rows, and whether more matched."""
    names = [c["name"] for c in body["columns"]]
    cells = [[_text(v) for v in row] for row in body["rows"]]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    right = [_numeric(c["type"]) for c in body["columns"]]

    def line(values: list[str]) -> str:
        padded = (
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        )
        return "  ".join(padded).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    count = len(cells)
    more = " (truncated: more rows matched; add a LIMIT)" if body["truncated"] else ""
    out.append(f"{count} row{'s' if count != 1 else ''}{more}")
    return "\n".join(out)


def _text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    return str(value)


def _numeric(kind: str) -> bool:
    bare = kind.removeprefix("Nullable(").removeprefix("LowCardinality(")
    return bare.startswith(("Int", "UInt", "Float", "Decimal"))


def main(url: str, token: str, sql: str, pairs: list[str], fmt: str, customer: str | None) -> int:
    """Print the answer (stdout) or why there is none (stderr); the exit status."""
    try:
        reply = ask(url, token, sql, parse_params(pairs), fmt, customer)
    except Failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render(reply, fmt))
    return 0
