"""Tally's Redis connections pack commands with hiredis: the same bytes as redis-py's own
packer, the same errors for what Redis cannot take, whatever the URL's transport."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import DataError

from services.common.redis import connect, limits_store
from services.common.settings import Settings

ARGUMENT = st.one_of(
    st.text(),
    st.binary(),
    st.binary().map(bytearray),
    st.binary().map(lambda raw: memoryview(raw)),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False),
)


def _pair() -> tuple[AbstractConnection, AbstractConnection]:
    packed = connect("redis://127.0.0.1:6379/0").connection_pool
    return Connection(), packed.connection_class(**packed.connection_kwargs)


@given(
    st.sampled_from(["EVALSHA", "HSET", "CLIENT SETINFO", b"CONFIG GET"]),
    st.lists(ARGUMENT, max_size=400),
)
def test_same_bytes_as_redis_py(command: str | bytes, arguments: list[Any]) -> None:
    plain, packed = _pair()
    expected = b"".join(plain.pack_command(command, *arguments))
    assert b"".join(packed.pack_command(command, *arguments)) == expected


@pytest.mark.parametrize("bad", [None, True, {}, [1]])
def test_what_redis_cannot_take_is_refused_alike(bad: Any) -> None:
    plain, packed = _pair()
    with pytest.raises(DataError):
        plain.pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        packed.pack_command("SET", "k", bad)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", Connection),
        ("rediss://127.0.0.1:6380/0", SSLConnection),
        ("unix:///run/redis.sock?db=0", UnixDomainSocketConnection),
    ],
)
def test_every_transport_keeps_its_kind(url: str, kind: type[Connection]) -> None:
    for client in (connect(url), limits_store(Settings(redis_url=url))):
        made = client.connection_pool.connection_class
        assert issubclass(made, kind) and made is not kind
