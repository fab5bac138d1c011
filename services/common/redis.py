"""The Redis client shared by the aggregator (writer) and the api (reader)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import RedisError

UNREACHABLE = (RedisError, OSError)
"""What a Redis that cannot answer raises: unreachable, but also loading, busy, out of
memory or read-only after a failover."""


def connect(url: str) -> Redis:
    return Redis.from_url(url, decode_responses=False, health_check_interval=30)
