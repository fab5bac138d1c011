"""The write-ahead log: a 202 waits until its events are on disk, fsync'd.

Why: the embedded broker of ``tally up`` keeps topics in memory, so what Kafka
acknowledged is lost with the process (or the machine) until the aggregator has counted
it.  Ingest therefore also appends every record it produces to this log and makes it
durable before answering; on the next start the records the aggregator had not yet
counted are produced again (``replay``).

- **Group commit.** Appends are buffered; one flush writes everything buffered and
  makes it durable with a single ``os.fsync`` (in a thread), so concurrent requests share
  a flush and the fsync rate, not the request rate, bounds the cost.  Appends arriving
  during a flush go together in the next one.
- **Segments.** Records go to numbered segment files, rolled by size and age, so the log
  is trimmed by deleting whole files: a closed segment goes once the aggregator's
  consumer group has *committed* offsets past every record in it (Faust commits only
  after its sinks stored a batch), read from Kafka, not from this process.
- **Failures.** A failed write or fsync fails the appends of that flush (the requests
  answer 503; nothing they carried is promised) and closes the segment, cut back to
  its last whole record, so later records never sit behind garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.logging import get_logger
from services.ingest.wal import segment
from services.ingest.wal.segment import Record

log = get_logger("tally.ingest.wal")


class JournalError(OSError):
    """The log could not make records durable (disk full, I/O error, closed)."""


@dataclass(eq=False)
class Segment:
    """A segment file and what is known of its records' fate."""

    sequence: int
    path: Path
    created: float = field(default_factory=time.monotonic)
    size: int = 0
    outstanding: int = 0  # durable records whose produce has not yet been settled
    high: dict[int, int] = field(default_factory=dict)  # partition -> highest offset
    closed: bool = False
    fd: int | None = None

    def counted(self, committed: Mapping[int, int]) -> bool:
        """Every record in it produced and past the consumer group's committed offset
        (the offset of the next record it will read)."""
        return (
            self.closed
            and self.outstanding == 0
            and all(committed.get(p, -1) > offset for p, offset in self.high.items())
        )

    def settle(self, offsets: Iterable[tuple[int, int]]) -> None:
        for partition, offset in offsets:
            self.high[partition] = max(offset, self.high.get(partition, -1))


@dataclass(eq=False)
class Ticket:
    """One append: durable once ``wait`` returns; ``Journal.release`` says its fate."""

    records: int
    data: bytes
    durable: asyncio.Future[None]
    segment: Segment | None = None
    released: bool = False

    async def wait(self) -> None:
        await asyncio.shield(self.durable)


class Journal:
    def __init__(self, directory: Path, segment_bytes: int, segment_seconds: float) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.segments: list[Segment] = []  # oldest first; the last may be active
        self._next = 1
        self._buffer: list[Ticket] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one writer of segment files at a time
        self._closed = False

    @classmethod
    def open(cls, directory: Path, segment_bytes: int, segment_seconds: float) -> Recovery:
        """The log in ``directory`` and the records its surviving segments hold (torn
        tails cut off), which ``replay`` must produce again."""
        directory.mkdir(parents=True, exist_ok=True)
        journal = cls(directory, segment_bytes, segment_seconds)
        recovered: list[tuple[Segment, list[Record]]] = []
        for sequence, path in segment.existing(directory):
            contents = segment.read(path)
            if contents.torn:
                log.warning(
                    "write-ahead log: torn tail cut",
                    segment=path.name,
                    kept_bytes=contents.valid_bytes,
                    cut_bytes=contents.file_bytes - contents.valid_bytes,
                )
            journal._next = sequence + 1
            if not contents.records:
                path.unlink()
                continue
            old = Segment(
                sequence,
                path,
                size=contents.valid_bytes,
                outstanding=len(contents.records),
                closed=True,
            )
            journal.segments.append(old)
            recovered.append((old, contents.records))
        return Recovery(journal, recovered)

    def append(self, records: list[Record]) -> Ticket:
        """Buffer ``records`` for the next flush; ``Ticket.wait`` returns once they are
        durable.  Every ticket must be ``release``d."""
        if self._closed:
            raise JournalError("the write-ahead log is closed")
        loop = asyncio.get_running_loop()
        ticket = Ticket(len(records), segment.encode(records), loop.create_future())
        self._buffer.append(ticket)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_all(), name="wal flush")
        return ticket

    def release(self, ticket: Ticket, offsets: Iterable[tuple[int, int]] | None) -> None:
        """Its records were produced at ``offsets`` (partition, offset), or, with
        ``None``, were not acknowledged to anyone: nothing keeps them then."""
        ticket.released = True
        if ticket.segment is not None:
            ticket.segment.outstanding -= ticket.records
            if offsets is not None:
                ticket.segment.settle(offsets)

    async def _flush_all(self) -> None:
        try:
            while self._buffer:
                batch, self._buffer = self._buffer, []
                async with self._lock:
                    await self._flush(batch)
        finally:
            self._flusher = None

    async def _flush(self, batch: list[Ticket]) -> None:
        live = [t for t in batch if not t.released]
        data = b"".join(t.data for t in live)
        if not data:
            return
        try:
            target = await asyncio.to_thread(self._write, data)
        except OSError as exc:
            log.error("write-ahead log write failed", error=repr(exc), records=len(live))
            await asyncio.to_thread(self._abandon_active)
            failure = JournalError(f"the write-ahead log could not store the events: {exc}")
            for ticket in live:
                if not ticket.durable.done():
                    ticket.durable.set_exception(failure)
                    ticket.durable.exception()  # retrieved: a cancelled waiter is not an error
            return
        target.size += len(data)
        for ticket in live:
            if ticket.released:  # its request gave up while the write went on
                continue
            ticket.segment = target
            target.outstanding += ticket.records
            if not ticket.durable.done():
                ticket.durable.set_result(None)

    def _write(self, data: bytes) -> Segment:
        """In a thread: a segment file to write to (rolled if full), the write, the fsync."""
        target = self._writable()
        _write_durably(target, data)
        return target

    def _writable(self) -> Segment:
        active = self.segments[-1] if self.segments else None
        if active is None or active.closed or self._full(active):
            if active is not None:
                _close(active)
            active = self._create()
        return active

    def _full(self, active: Segment) -> bool:
        aged = time.monotonic() - active.created >= self.segment_seconds
        return active.size >= self.segment_bytes or (aged and active.size > 0)

    def _create(self) -> Segment:
        sequence, self._next = self._next, self._next + 1
        path = self.directory / segment.name(sequence)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_directory(self.directory)  # the new file's name is durable too
        created = Segment(sequence, path, fd=fd)
        self.segments.append(created)
        return created

    def _abandon_active(self) -> None:
        """After a failed write: cut the active segment back to its whole records and
        close it; the next flush starts a new file."""
        if not self.segments or self.segments[-1].closed:
            return
        active = self.segments[-1]
        with contextlib.suppress(OSError):
            os.truncate(active.path, active.size)
        _close(active)

    async def trim(self, committed: Mapping[int, int]) -> int:
        """Close an active segment past its age, delete the segments counted according
        to ``committed`` (partition -> the group's committed offset); how many went."""
        async with self._lock:
            if self.segments and not self.segments[-1].closed:
                active = self.segments[-1]
                if self._full(active) or (active.size == 0 and len(self.segments) > 1):
                    _close(active)
            gone = [s for s in self.segments if s.counted(committed)]
            for old in gone:
                with contextlib.suppress(FileNotFoundError):
                    old.path.unlink()
            self.segments = [s for s in self.segments if s not in gone]
        return len(gone)

    def partitions(self) -> set[int]:
        """The partitions its records went to: those whose committed offsets matter."""
        return {p for each in self.segments for p in each.high}

    async def close(self) -> None:
        """Refuse further appends, finish the flush under way, close the files."""
        self._closed = True
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        async with self._lock:
            for each in self.segments:
                _close(each)


@dataclass(frozen=True)
class Recovery:
    """A just-opened log, and what it held from before (oldest first)."""

    journal: Journal
    pending: list[tuple[Segment, list[Record]]]

    @property
    def records(self) -> int:
        return sum(len(records) for _, records in self.pending)


def _write_durably(target: Segment, data: bytes) -> None:
    assert target.fd is not None
    view = memoryview(data)
    while view:
        written = os.write(target.fd, view)
        view = view[written:]
    os.fsync(target.fd)


def _close(each: Segment) -> None:
    each.closed = True
    if each.fd is not None:
        fd, each.fd = each.fd, None
        with contextlib.suppress(OSError):
            os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
