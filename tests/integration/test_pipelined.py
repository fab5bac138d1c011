"""The enforcement path's pipelined Redis connection: in order, and never stuck."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.api.enforcement.pipelined import Pipelined
from services.common.redis import pack
from tests.conftest import REDIS_URL


async def test_replies_reach_their_callers_in_order() -> None:
    redis = Pipelined(REDIS_URL, 1.0)
    try:
        replies = await asyncio.gather(*(redis.execute(pack("ECHO", str(n))) for n in range(500)))
        assert replies == [str(n).encode() for n in range(500)]
        with pytest.raises(ResponseError):
            await redis.execute(pack("NO-SUCH-COMMAND"))
        assert await redis.execute(pack("PING")) == b"PONG"  # the connection survives
    finally:
        await redis.aclose()


async def test_a_redis_that_stops_answering_fails_fast() -> None:
    """It answers the SELECT sent on connect, then nothing: the watchdog cuts it off."""

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n")
        writer.write(b"+OK\r\n")
        await asyncio.sleep(30)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redis = Pipelined(f"redis://127.0.0.1:{port}/0", 0.2)
    try:
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await redis.execute(pack("PING"))
        assert time.monotonic() - started < 1.0
    finally:
        await redis.aclose()
        server.close()


async def test_nothing_listening_is_a_connection_error() -> None:
    redis = Pipelined("redis://127.0.0.1:1/0", 0.2)
    with pytest.raises(RedisConnectionError):
        await redis.execute(pack("PING"))
    await redis.aclose()
