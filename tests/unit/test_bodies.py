"""Bodies read with a bound in time: a client that stalls mid-body is answered 408, not
waited for without end (uvicorn bounds only the wait between requests)."""

from __future__ import annotations

import pytest

from services.common import bodies
from services.common.problems import Problem
from tests.http_support import arriving


async def test_a_body_that_stalls_is_a_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "BODY_SECONDS", 0.05)
    with pytest.raises(Problem) as info:
        await bodies.bounded(arriving([b'{"meter": ', b'"api']), 1_000)
    assert (info.value.status, info.value.kind.slug) == (408, "request-timeout")
    assert "0.05 s" in info.value.detail


async def test_a_body_in_slow_chunks_is_read_whole_within_the_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bodies, "BODY_SECONDS", 2.0)
    body = await bodies.bounded(arriving([b'{"meter": ', b'"api_calls"', b"}"], 0.02), 1_000)
    assert body == b'{"meter": "api_calls"}'


async def test_the_time_bounds_the_whole_body_not_each_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk every 20 ms keeps no read open past the bound: a byte a minute would."""
    monkeypatch.setattr(bodies, "BODY_SECONDS", 0.05)
    with pytest.raises(Problem) as info:
        await bodies.bounded(arriving([b" "] * 10 + [b"{}"], 0.02), 1_000)
    assert info.value.status == 408
