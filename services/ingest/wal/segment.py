"""One segment file of the write-ahead log: length-prefixed, CRC-checked records.

A record is ``length (u32) | crc32 (u32) | key length (u16) | key | payload``, where the
payload is an envelope exactly as it goes to Kafka (``schemas.envelope``): the log keeps
what was produced, not a second encoding of events.  A crash in the middle of a write
leaves a torn tail — a short header, a short body, or bytes whose CRC does not match —
and reading stops there: a record is replayed whole or not at all.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HEADER = struct.Struct("<II")  # body length, crc32 of the body
KEY_LENGTH = struct.Struct("<H")
SUFFIX = ".wal"
MAX_RECORD_BYTES = 64 * 2**20  # an envelope is under 1 MB; more is garbage, not a record


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record to be: its key (the customer) and its value (an envelope)."""

    key: bytes
    value: bytes


def encode(records: Iterable[Record]) -> bytes:
    out = bytearray()
    for record in records:
        body = KEY_LENGTH.pack(len(record.key)) + record.key + record.value
        out += HEADER.pack(len(body), zlib.crc32(body)) + body
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Contents:
    """What a segment file holds: its whole records, and where they end."""

    records: list[Record]
    valid_bytes: int
    file_bytes: int

    @property
    def torn(self) -> bool:
        return self.valid_bytes < self.file_bytes


def decode(data: bytes) -> Contents:
    """The whole records at the start of ``data``, up to the first torn or corrupt one."""
    records: list[Record] = []
    at = 0
    while at + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, at)
        start, end = at + HEADER.size, at + HEADER.size + length
        if length < KEY_LENGTH.size or length > MAX_RECORD_BYTES or end > len(data):
            break
        body = data[start:end]
        if zlib.crc32(body) != crc:
            break
        (key_length,) = KEY_LENGTH.unpack_from(body)
        if KEY_LENGTH.size + key_length > length:
            break
        key_end = KEY_LENGTH.size + key_length
        records.append(Record(body[KEY_LENGTH.size : key_end], body[key_end:]))
        at = end
    return Contents(records, at, len(data))


def read(path: Path) -> Contents:
    """A segment's records; a torn tail is cut off the file, so it is never read again
    and never has whole records written after it."""
    contents = decode(path.read_bytes())
    if contents.torn:
        with path.open("r+b") as file:
            file.truncate(contents.valid_bytes)
            os.fsync(file.fileno())
    return contents


def name(sequence: int) -> str:
    return f"{sequence:016d}{SUFFIX}"


def sequence_of(path: Path) -> int | None:
    stem = path.name.removesuffix(SUFFIX)
    return int(stem) if path.name.endswith(SUFFIX) and stem.isdigit() else None


def existing(directory: Path) -> list[tuple[int, Path]]:
    """The segment files in ``directory``, oldest first."""
    found = [(sequence_of(p), p) for p in directory.iterdir()]
    return sorted((seq, p) for seq, p in found if seq is not None)
