"""Kafka topic ids: which life of a topic a record comes from.

A topic that is deleted and created again starts its offsets again at 0 — and so does
every topic of the embedded broker, which keeps them in memory, when it restarts.
Offsets alone therefore cannot say whether a record was already applied.  Kafka (since
2.8, KIP-516) gives a topic a random UUID when it is created and a new one when it is
created again; Tansu does the same (measured on 0.6: a fresh UUIDv7 per creation, the
same one for as long as the topic lives).  The broker draws it, so no restart, delete
or redeploy can bring an old one back — unlike an incarnation that Tally would have to
write and keep itself (a marker record is lost to retention, and a topic that a
producer or an operator creates without Tally has none).

aiokafka asks for metadata only in versions older than the id (v0-v5), so this module
asks for it itself: ApiVersions v0, then Metadata v10-v12, over a plain connection to a
bootstrap server.  A broker too old to know topic ids yields ``NO_ID``; offsets then
fall back to ``TALLY_KAFKA_INCARNATION`` alone.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Sequence

from services.common.logging import get_logger

log = get_logger("tally.kafka")

NO_ID = ""
API_VERSIONS, METADATA = 18, 3
METADATA_VERSIONS = range(10, 13)  # the topic id appears in v10; v12 is what we know
UNKNOWN_TOPIC = 3
TIMEOUT_SECONDS = 10.0  # per bootstrap server
_ZERO = bytes(16)


class TopicIdError(RuntimeError):
    """The broker could not say which topic a name stands for (it may be being recreated)."""


async def topic_ids(bootstrap_servers: str, names: Sequence[str]) -> dict[str, str]:
    """Each topic's id as Kafka prints it (URL-safe base64), ``NO_ID`` if the broker has none.

    Tries the bootstrap servers in turn; a missing topic is an error, not ``NO_ID``.
    """
    failures = []
    for address in bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                return await _ask(host, int(port), list(names))
        except (OSError, TimeoutError, EOFError, ValueError, struct.error) as exc:
            failures.append(f"{address.strip()}: {exc!r}")
    raise TopicIdError(f"no broker answered for topic ids: {'; '.join(failures)}")


async def _ask(host: str, port: int, names: list[str]) -> dict[str, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        body = await _call(reader, writer, _request(API_VERSIONS, 0, b"", flexible=False))
        version = _metadata_version(body)
        if version is None:
            log.warning(
                "the broker reports no topic ids: set TALLY_KAFKA_INCARNATION anew "
                "whenever a topic is recreated"
            )
            return dict.fromkeys(names, NO_ID)
        body = await _call(reader, writer, _request(METADATA, version, _metadata(names, version)))
        return _ids(body, names)
    finally:
        writer.close()
        await writer.wait_closed()


async def _call(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> _Reader:
    """One request, one response; the caller's requests go one at a time (correlation 0)."""
    writer.write(struct.pack(">i", len(request)) + request)
    await writer.drain()
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return _Reader(await reader.readexactly(size))


def _request(api_key: int, version: int, body: bytes, flexible: bool = True) -> bytes:
    client = b"tally"
    header = struct.pack(">hhih", api_key, version, 0, len(client)) + client
    return header + (b"\x00" if flexible else b"") + body  # flexible headers: no tags


def _metadata_version(response: _Reader) -> int | None:
    """The newest Metadata version both sides know, if it carries topic ids."""
    response.int32()  # correlation id
    if (error := response.int16()) != 0:
        raise ValueError(f"ApiVersions failed with error code {error}")
    for _ in range(response.int32()):
        key, low, high = response.int16(), response.int16(), response.int16()
        if key == METADATA:
            usable = [v for v in METADATA_VERSIONS if low <= v <= high]
            return max(usable) if usable else None
    return None


def _metadata(names: list[str], version: int) -> bytes:
    topics = b"".join(_ZERO + _compact(name) + b"\x00" for name in names)
    flags = b"\x00\x00\x00" if version == 10 else b"\x00\x00"  # no auto-creation, no ACL info
    return _varint(len(names) + 1) + topics + flags + b"\x00"


def _ids(response: _Reader, names: list[str]) -> dict[str, str]:
    response.int32()  # correlation id
    response.tags()
    response.int32()  # throttle time
    for _ in range(response.count()):  # brokers
        response.int32(), response.string(), response.int32(), response.string()
        response.tags()
    response.string()  # cluster id
    response.int32()  # controller id
    found: dict[str, str] = {}
    for _ in range(response.count()):
        error, name, raw = response.int16(), response.string(), response.take(16)
        if error == UNKNOWN_TOPIC:
            raise TopicIdError(f"topic {name!r} does not exist")
        if error != 0:
            raise TopicIdError(f"metadata for topic {name!r} failed with error code {error}")
        found[name or ""] = NO_ID if raw == _ZERO else _kafka_uuid(raw)
        response.take(1)  # is_internal
        for _ in range(response.count()):  # partitions
            response.take(2 + 4 + 4 + 4)
            for _ in range(3):  # replicas, in-sync replicas, offline replicas
                response.take(4 * response.count())
            response.tags()
        response.int32()  # authorized operations
        response.tags()
    missing = [n for n in names if n not in found]
    if missing:
        raise TopicIdError(f"the broker said nothing about topics {missing}")
    return {name: found[name] for name in names}


def _kafka_uuid(raw: bytes) -> str:
    """How Kafka writes a topic id (``kafka-topics --describe``): URL-safe base64, no padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _compact(text: str) -> bytes:
    data = text.encode()
    return _varint(len(data) + 1) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Reader:
    """Reads the Kafka wire format front to back."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._data):
            raise ValueError("the broker's response ended early")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def int16(self) -> int:
        return int(struct.unpack(">h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def count(self) -> int:
        """A compact array's length (0 for a null array)."""
        return max(self.varint() - 1, 0)

    def string(self) -> str | None:
        size = self.varint() - 1
        return None if size < 0 else self.take(size).decode()

    def tags(self) -> None:
        for _ in range(self.varint()):
            self.varint()
            self.take(self.varint())
