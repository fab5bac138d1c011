"""``collector_paused``: no automatic collection inside, always back on after the block
that paused it, and a collector someone else switched off left off.
``without_collection``: the pause ends once the work has dropped what it made, so no
collection walks it."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from services.common.collector import collector_paused, without_collection


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


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the collections that start while the test runs."""
    started: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.collect()
    gc.callbacks.append(record)
    yield started
    gc.callbacks.remove(record)


def batch() -> list[dict[str, int]]:
    """Containers enough for many young collections (700 allocations each by default)."""
    return [{"n": n} for n in range(50 * gc.get_threshold()[0])]


async def test_what_the_work_dropped_is_not_walked_when_collection_resumes(
    collections: list[int],
) -> None:
    @without_collection
    async def judge() -> int:
        events = batch()
        assert not gc.isenabled()
        await asyncio.sleep(0)
        return len(events)

    assert await judge() == 50 * gc.get_threshold()[0]
    assert gc.isenabled()
    assert collections == []


def test_a_batch_held_past_the_pause_is_walked_once_it_ends(collections: list[int]) -> None:
    """What ``without_collection`` avoids: the block ends with the batch still held."""
    with collector_paused():
        events = batch()
    assert collections == [0] and len(events) > 0


async def test_a_failing_work_turns_collection_back_on() -> None:
    @without_collection
    async def judge() -> None:
        raise RuntimeError("judging failed")

    with pytest.raises(RuntimeError):
        await judge()
    assert gc.isenabled()
