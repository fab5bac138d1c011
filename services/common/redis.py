"""The Redis clients shared by the aggregator (writer) and the api (reader)."""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from services.common.settings import Settings

UNREACHABLE = (RedisError, OSError)
"""What a Redis that cannot answer raises: unreachable, but also loading, busy, out of
memory or read-only after a failover — each caller's failure mode decides what next."""


def connect(url: str, connect_timeout: float = 2.0, timeout: float = 2.0) -> Redis:
    """A client whose every wait is bounded: a Redis that is down or hangs costs a
    command ``connect_timeout`` or ``timeout`` seconds, then an error (answered 503).

    A dropped or refused connection is retried once, at once (a pooled connection that
    went stale when Redis restarted); a timeout is not, since a Redis that did not
    answer in time will not answer the second time either.
    """
    pool = ConnectionPool.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return Redis(connection_pool=packing(pool))


def limits_store(settings: Settings) -> Redis:
    """Redis for what surrounds decisions (key lookups, projections), with short
    timeouts: waiting on a sick Redis is worse than the configured failure mode."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.enforce_redis_connections,
        timeout=settings.enforce_redis_timeout,
        socket_timeout=settings.enforce_redis_timeout,
        socket_connect_timeout=settings.enforce_redis_timeout,
        health_check_interval=30,
    )
    return Redis(connection_pool=packing(pool))


def pack(*parts: Any) -> bytes:
    """One command in RESP, the Redis protocol, encoded by hiredis (in C)."""
    packed: bytes = hiredis.pack_command(parts)
    return packed


class _Packed:
    """Packs commands with hiredis (C) instead of redis-py's asyncio packer (Python).

    redis-py's synchronous client packs with hiredis when it is installed; its asyncio
    client never does, and its packer joins its whole buffer again for every argument:
    the aggregator's Lua call for a customer's share of a batch (110 arguments) took
    73 to 103 µs to pack, 10 to 18 µs here, the same bytes.  What hiredis cannot take
    (a ``bytearray``, or a type Redis has no form for) goes to redis-py's packer, which
    converts it or refuses it with its own ``DataError``."""

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str):  # "CLIENT SETINFO" is two words, as redis-py sends it
            args = (*command.encode().split(), *args[1:])
        elif b" " in command:
            args = (*command.split(), *args[1:])
        try:
            return [pack(*args)]
        except TypeError:
            packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
            return packed


class _PackedConnection(_Packed, Connection):
    pass


class _PackedSSLConnection(_Packed, SSLConnection):
    pass


class _PackedUnixConnection(_Packed, UnixDomainSocketConnection):
    pass


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _PackedConnection,
    SSLConnection: _PackedSSLConnection,
    UnixDomainSocketConnection: _PackedUnixConnection,
}


def packing(pool: ConnectionPool) -> ConnectionPool:
    """``pool``, making connections that pack with hiredis (before it made any): the
    same class its URL chose (TCP, TLS or a Unix socket), with the faster packer."""
    pool.connection_class = _PACKED.get(pool.connection_class, pool.connection_class)
    return pool
