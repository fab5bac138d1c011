"""The Redis clients shared by the aggregator (writer) and the api (reader)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
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
    return Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


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
    return Redis(connection_pool=pool)
