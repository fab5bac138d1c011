"""Ingest's write-ahead log on a real file system: append, reopen, torn tails, group
commit, trim, and a failing disk."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.ingest.wal import segment
from services.ingest.wal.journal import Journal, JournalError
from services.ingest.wal.replay import replay
from services.ingest.wal.segment import Record

MIB = 2**20


def records(prefix: str, count: int) -> list[Record]:
    return [Record(f"cust-{i % 3}".encode(), f'{{"{prefix}":{i}}}'.encode()) for i in range(count)]


OPENED: list[Journal] = []


@pytest.fixture(autouse=True)
async def close_journals() -> AsyncIterator[None]:
    """Tests leave journals open on purpose (a crash closes nothing); their files are
    closed after each test all the same."""
    yield
    while OPENED:
        await OPENED.pop().close()


def opened(directory: Path, segment_bytes: int = MIB, seconds: float = 60) -> Journal:
    recovery = Journal.open(directory, segment_bytes, seconds)
    assert recovery.pending == []
    OPENED.append(recovery.journal)
    return recovery.journal


def files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


async def durable(journal: Journal, batch: list[Record], at: int = 0) -> None:
    ticket = journal.append(batch)
    await ticket.wait()
    journal.release(ticket, [(0, at + i) for i in range(len(batch))])


async def test_what_was_made_durable_is_recovered_whole_and_in_order(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    first, second = records("a", 5), records("b", 7)
    await durable(journal, first)
    await durable(journal, second, at=5)
    # no close: as after a kill -9
    recovery = Journal.open(tmp_path, MIB, 60)
    assert [r for _, batch in recovery.pending for r in batch] == first + second
    assert recovery.records == 12


@pytest.mark.parametrize("tear", ["short header", "short body", "garbage"])
async def test_a_torn_tail_is_cut_off_on_open_and_never_replayed_half(
    tmp_path: Path, tear: str
) -> None:
    journal = opened(tmp_path)
    await durable(journal, records("a", 3))
    (path,) = files(tmp_path)
    whole = path.stat().st_size
    next_record = segment.encode(records("torn", 1))
    tail = {
        "short header": next_record[:5],
        "short body": next_record[:-3],
        "garbage": b"\xff" * 40,
    }[tear]
    with path.open("ab") as file:
        file.write(tail)
    recovery = Journal.open(tmp_path, MIB, 60)
    assert [r for _, batch in recovery.pending for r in batch] == records("a", 3)
    assert path.stat().st_size == whole  # cut: a later append never follows the tear


async def test_a_record_whose_crc_does_not_match_ends_what_is_read(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    await durable(journal, records("a", 2))
    (path,) = files(tmp_path)
    first_end = len(segment.encode(records("a", 1)))
    data = bytearray(path.read_bytes())
    data[first_end + segment.HEADER.size + 4] ^= 0x01  # one bit of the second record's body
    path.write_bytes(bytes(data))
    recovery = Journal.open(tmp_path, MIB, 60)
    assert [r for _, batch in recovery.pending for r in batch] == records("a", 1)


async def test_concurrent_appends_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls: list[int] = []

    def counting_fsync(fd: int) -> None:  # a disk that takes 5 ms per flush
        calls.append(fd)
        time.sleep(0.005)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    journal = opened(tmp_path)
    requests = 200
    await asyncio.gather(*(durable(journal, records(f"r{i}", 2)) for i in range(requests)))
    monkeypatch.setattr(os, "fsync", real_fsync)
    print(f"{requests} concurrent appends: {len(calls)} fsyncs")
    assert len(calls) < requests / 4  # the segment's directory entry is one of them
    recovery = Journal.open(tmp_path, MIB, 60)
    assert recovery.records == 2 * requests


async def test_segments_go_only_once_the_group_committed_past_every_record(
    tmp_path: Path,
) -> None:
    journal = opened(tmp_path, segment_bytes=50)  # one append fills a segment
    ticket_a = journal.append(records("a", 4))
    await ticket_a.wait()
    journal.release(ticket_a, [(0, 10), (1, 20), (0, 11), (1, 21)])
    ticket_b = journal.append(records("b", 4))  # rolls: the first segment is full
    await ticket_b.wait()
    first, second = journal.segments
    assert first.closed and not second.closed

    assert await journal.trim({0: 12, 1: 21}) == 0  # partition 1's record 21 not counted
    assert await journal.trim({0: 12}) == 0  # partition 1 never committed
    assert await journal.trim({0: 12, 1: 22}) == 1
    assert not first.path.exists() and second.path.exists()

    await journal.close()  # closes the last segment
    assert await journal.trim({0: 1_000, 1: 1_000}) == 0  # ticket_b not yet settled
    journal.release(ticket_b, [(2, 0)] * 4)
    assert await journal.trim({2: 1}) == 1
    assert files(tmp_path) == []


async def test_records_never_acknowledged_do_not_hold_the_log(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    ticket = journal.append(records("refused", 3))
    await ticket.wait()
    journal.release(ticket, None)  # the produce failed: the request answered 503
    await journal.close()
    assert await journal.trim({}) == 1


async def test_an_active_segment_is_closed_for_trimming_by_age(tmp_path: Path) -> None:
    journal = opened(tmp_path, seconds=0.05)
    await durable(journal, records("a", 2))
    assert await journal.trim({0: 100}) == 0  # still young: it may take more records
    await asyncio.sleep(0.06)
    assert await journal.trim({0: 100}) == 1


async def test_a_failed_write_fails_its_appends_and_the_log_goes_on_in_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = opened(tmp_path)
    await durable(journal, records("kept", 2))
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:  # ENOSPC after a partial write
        monkeypatch.setattr(os, "write", real_write)
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    ticket = journal.append(records("lost", 2))
    with pytest.raises(JournalError, match="No space left"):
        await ticket.wait()
    journal.release(ticket, None)
    await durable(journal, records("after", 2))
    assert len(journal.segments) == 2
    recovery = Journal.open(tmp_path, MIB, 60)
    replayed = [r for _, batch in recovery.pending for r in batch]
    assert replayed == records("kept", 2) + records("after", 2)


async def test_appends_after_close_are_refused(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    await journal.close()
    with pytest.raises(JournalError):
        journal.append(records("late", 1))


async def test_replay_notes_the_new_offsets_so_the_old_segments_can_go(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    await durable(journal, records("a", 5))
    recovery = Journal.open(tmp_path, MIB, 60)
    produced: list[Record] = []

    async def produce(batch: list[Record]) -> list[tuple[int, int]]:
        start = len(produced)
        produced.extend(batch)
        return [(3, start + i) for i in range(len(batch))]

    await replay(recovery, produce)
    assert produced == records("a", 5)
    again = recovery.journal
    assert await again.trim({3: 4}) == 0
    assert await again.trim({3: 5}) == 1
