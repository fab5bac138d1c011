"""``collector_paused``: no automatic collection inside, always back on after the block
that paused it, and a collector someone else switched off left off."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from services.common.collector import collector_paused


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    gc.enable()
    yield
    gc.enable()


def test_the_collector_is_off_inside_and_on_after() -> None:
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_failure_inside_turns_it_back_on() -> None:
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("judging failed")
    assert gc.isenabled()


def test_a_collector_switched_off_elsewhere_stays_off() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


async def test_overlapping_requests_never_keep_it_off_past_the_first() -> None:
    """B enters while A holds the pause; A's end turns collection on with B still inside
    (so a stream of overlapping requests cannot hold it off for good); B's end leaves it on."""
    a_done, b_inside = asyncio.Event(), asyncio.Event()
    seen: dict[str, bool] = {}

    async def a() -> None:
        with collector_paused():
            await b_inside.wait()
        a_done.set()

    async def b() -> None:
        with collector_paused():
            b_inside.set()
            await a_done.wait()
            seen["b after a ended"] = gc.isenabled()
        seen["after both"] = gc.isenabled()

    await asyncio.gather(a(), b())
    assert seen == {"b after a ended": True, "after both": True}
