"""Tally's answer to a batch of events, read in the emitter's thread.

Ingest answers a batch with its counts and a result per event (``accepted``,
``duplicate`` or ``rejected`` with its errors); the emitter asks for ``Prefer:
return=minimal``, so the results are only the events not accepted.  A whole answer for
2,000 events is a 60 kB JSON body (from a Tally that ignores the preference); decoding it
and walking the results took one to two ms of the event loop in a single step, a stall
of every request in flight.  Read here, in the emitter's thread, the loop gets only the
counts and the few rejections to report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tally_sdk.backoff import retry_after
from tally_sdk.pipelined import Reply


def _decoder() -> Callable[[bytes], Any]:
    """``orjson.loads`` when installed (several times faster on these bodies), else json's."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency; kept for vendoring
        return json.loads
    return orjson.loads


_loads = _decoder()


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    status: int
    retry_after: float | None = None
    counted: bool = False
    """A result per event came back: ``accepted``, ``duplicates`` and ``rejected`` hold
    them; otherwise ``problem`` is the body (a whole-request refusal, or none)."""
    accepted: int = 0
    duplicates: int = 0
    rejected: list[tuple[int, list[dict[str, str]]]] = field(default_factory=list)
    """(index in the batch, errors) of each event ingest rejected."""
    problem: dict[str, Any] | None = None


def json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = _loads(raw)
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        return None
    return body if isinstance(body, dict) else None


def read_answer(status: int, headers: Mapping[str, str], raw: bytes) -> BatchAnswer:
    """What ingest said about a batch; ``headers`` by lower-case name.  The counts come
    from the answer's totals, the rejections from its results: asked with ``Prefer:
    return=minimal``, ingest lists only the events it did not accept."""
    wait = retry_after(headers)
    body = json_object(raw) or {}
    results = body.get("results")
    if status not in (202, 422) or not isinstance(results, list):
        return BatchAnswer(status, wait, problem=body or None)
    rejected = [
        (int(result["index"]), list(result.get("errors", [])))
        for result in results
        if result["status"] == "rejected"
    ]
    return BatchAnswer(status, wait, True, int(body["accepted"]), int(body["duplicates"]), rejected)


def read_reply(reply: Reply) -> BatchAnswer:
    return read_answer(reply.status, reply.headers, reply.body)
