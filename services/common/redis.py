"""The Redis clients shared by the aggregator (writer) and the api (reader)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from services.common.settings import Settings

UNREACHABLE = (RedisError, OSError)
"""What a Redis that cannot answer raises: unreachable, but also loading, busy, out of
memory or read-only after a failover — each caller's failure mode decides what next."""


def connect(url: str) -> Redis:
    return Redis.from_url(url, decode_responses=False, health_check_interval=30)


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
