"""The Redis client shared by the aggregator (writer) and the api (reader)."""

from __future__ import annotations

from redis.asyncio import Redis


def connect(url: str) -> Redis:
    return Redis.from_url(url, decode_responses=False, health_check_interval=30)
