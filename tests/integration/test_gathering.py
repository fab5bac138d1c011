"""The aggregator's rows gathered for ClickHouse (chDB or server): several batches go in
as one insert, a batch settles only once its rows are in, and a failed insert loses
nothing and settles nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import orjson
import pytest

from schemas.envelope import StoredEvent
from schemas.events import utcnow
from services.aggregator import gathering
from services.aggregator.clickhouse_sink import ClickHouseSink, encode, joined
from services.aggregator.gathering import Gathering
from services.common.clickhouse import ClickHouse, ClickHouseError
from services.common.waits import stop_task


class Counted(ClickHouseSink):
    """The real sink, counting the inserts that went in."""

    inserts = 0

    async def insert(self, rows: bytes) -> None:
        await super().insert(rows)
        self.inserts += 1


@pytest.fixture
def sink(ch: ClickHouse) -> Counted:
    return Counted(ch)


class Away:
    """The events table renamed away (every insert fails) and back."""

    def __init__(self, ch: ClickHouse) -> None:
        self._ch, self._table, self.gone = ch, f"{ch.database}.events", False

    def leave(self) -> None:
        self._ch.command(f"RENAME TABLE {self._table} TO {self._table}_away")
        self.gone = True

    def back(self) -> None:
        if self.gone:
            self._ch.command(f"RENAME TABLE {self._table}_away TO {self._table}")
            self.gone = False


@pytest.fixture
def away(ch: ClickHouse) -> Iterator[Away]:
    table = Away(ch)
    yield table
    table.back()


def events(customer: str, *ids: str) -> list[StoredEvent]:
    now = utcnow()
    return [StoredEvent(i, "src", "api_call", customer, now, Decimal(1), {}, now) for i in ids]


def rows(ch: ClickHouse, customer: str) -> list[str]:
    found = ch.query(
        f"SELECT id FROM {ch.database}.events FINAL WHERE customer = {{c:String}} ORDER BY id",
        {"c": customer},
    )
    return [row[0] for row in found]


@contextlib.asynccontextmanager
async def running(rows_of: Gathering) -> AsyncIterator[None]:
    """``rows_of.run()`` in the background for the block."""
    task = asyncio.create_task(rows_of.run())
    try:
        yield
    finally:
        await stop_task(task)


class Done:
    """The batches settled, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._more = asyncio.Event()

    def settles(self, name: str) -> gathering.Settled:
        async def settled() -> None:
            self.names.append(name)
            self._more.set()

        return settled

    async def wait(self, count: int, seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while len(self.names) < count:
                self._more.clear()
                await self._more.wait()


async def test_several_batches_go_in_as_one_insert_and_then_settle_in_order(
    ch: ClickHouse, sink: Counted, tenant: str
) -> None:
    customer, done = f"{tenant}-one", Done()
    rows_of = Gathering(sink, rows=1000, seconds=60)
    await rows_of.add(events(customer, "a", "b"), done.settles("first"))
    await rows_of.add([], done.settles("nothing to insert"))
    await rows_of.add(events(customer, "c"), done.settles("second"))
    assert (rows(ch, customer), done.names, rows_of.waiting) == ([], [], 3)
    await rows_of.flush()
    assert rows(ch, customer) == ["a", "b", "c"]
    assert done.names == ["first", "nothing to insert", "second"]
    assert (sink.inserts, rows_of.waiting) == (1, 0)


async def test_a_failed_insert_settles_nothing_and_keeps_every_row_before_later_ones(
    ch: ClickHouse, sink: Counted, away: Away, tenant: str
) -> None:
    customer, done = f"{tenant}-fail", Done()
    rows_of = Gathering(sink, rows=1000, seconds=60)
    await rows_of.add(events(customer, "a"), done.settles("first"))
    away.leave()
    with pytest.raises(ClickHouseError):
        await rows_of.flush()
    away.back()
    assert (done.names, rows_of.waiting) == ([], 1)
    await rows_of.add(events(customer, "b"), done.settles("second"))
    await rows_of.flush()
    assert (rows(ch, customer), done.names) == (["a", "b"], ["first", "second"])


async def test_run_inserts_once_rows_are_waiting_without_waiting_out_the_seconds(
    ch: ClickHouse, sink: Counted, tenant: str
) -> None:
    customer, done = f"{tenant}-full", Done()
    rows_of = Gathering(sink, rows=3, seconds=3600)
    async with running(rows_of):
        await rows_of.add(events(customer, "a", "b"), done.settles("first"))
        await asyncio.sleep(0.3)
        assert done.names == []
        await rows_of.add(events(customer, "c"), done.settles("second"))
        await done.wait(2, seconds=10)
    assert rows(ch, customer) == ["a", "b", "c"]


async def test_run_inserts_what_waited_the_seconds(
    ch: ClickHouse, sink: Counted, tenant: str
) -> None:
    customer, done = f"{tenant}-old", Done()
    rows_of = Gathering(sink, rows=1000, seconds=0.4)
    async with running(rows_of):
        began = time.monotonic()
        await rows_of.add(events(customer, "a"), done.settles("first"))
        await asyncio.sleep(0.1)
        await rows_of.add(events(customer, "b"), done.settles("second"))
        await done.wait(2, seconds=10)
        assert time.monotonic() - began >= 0.4  # the oldest's wait, not the newest's
        assert time.monotonic() - began < 5
        assert sink.inserts == 1


async def test_a_hurried_run_inserts_what_waits_and_then_every_batch_as_it_comes(
    ch: ClickHouse, sink: Counted, tenant: str
) -> None:
    customer, done = f"{tenant}-hurry", Done()
    rows_of = Gathering(sink, rows=1000, seconds=3600)
    async with running(rows_of):
        await rows_of.add(events(customer, "a"), done.settles("waiting"))
        await asyncio.sleep(0.3)
        assert done.names == []
        rows_of.hurry()
        await done.wait(1, seconds=10)
        await rows_of.add(events(customer, "b"), done.settles("after"))
        await done.wait(2, seconds=10)
    assert (rows(ch, customer), sink.inserts) == (["a", "b"], 2)


async def test_insert_soon_inserts_what_waits_and_gathers_again_after(
    ch: ClickHouse, sink: Counted, tenant: str
) -> None:
    customer, done = f"{tenant}-soon", Done()
    rows_of = Gathering(sink, rows=1000, seconds=3600)
    async with running(rows_of):
        rows_of.insert_soon()  # nothing waits: nothing to do
        await rows_of.add(events(customer, "a"), done.settles("waiting"))
        await asyncio.sleep(0.3)
        assert done.names == []
        rows_of.insert_soon()  # as a rebalance starts
        await done.wait(1, seconds=10)
        await rows_of.add(events(customer, "b"), done.settles("after"))
        await asyncio.sleep(0.3)
        assert (done.names, rows_of.waiting) == (["waiting"], 1)


async def test_batches_wait_for_room_while_rows_cannot_go_in(
    ch: ClickHouse, sink: Counted, tenant: str
) -> None:
    customer = f"{tenant}-room"
    rows_of = Gathering(sink, rows=2, seconds=60)
    await rows_of.add(events(customer, *"abcdefgh"))  # ROOM (4) times rows
    held = asyncio.create_task(rows_of.add(events(customer, "i")))
    await asyncio.sleep(0.2)
    assert (held.done(), rows_of.waiting) == (False, 2 * gathering.ROOM)
    await rows_of.flush()
    async with asyncio.timeout(5):
        await held
    assert rows_of.waiting == 1


def test_joined_arrays_read_as_every_row_in_order(tenant: str) -> None:
    first, second = events(tenant, "a", "b"), events(tenant, "c")
    chunks = [encode(first), b"[]", encode(second)]
    assert orjson.loads(joined(chunks)) == orjson.loads(encode(first + second))
    assert joined([encode(second)]) == encode(second)


async def test_run_retries_a_failed_insert_and_batches_wait_for_room_until_it_goes_in(
    ch: ClickHouse, sink: Counted, away: Away, tenant: str
) -> None:
    customer, done = f"{tenant}-outage", Done()
    rows_of = Gathering(sink, rows=2, seconds=0.05)
    away.leave()
    async with running(rows_of):
        await rows_of.add(events(customer, *"abcdefg"), done.settles("first"))  # 7 rows + 1
        held = asyncio.create_task(rows_of.add(events(customer, "h"), done.settles("second")))
        await asyncio.sleep(0.5)
        assert (held.done(), done.names) == (False, [])
        away.back()
        await done.wait(2, seconds=15)
        assert held.done()
    assert rows(ch, customer) == list("abcdefgh")
