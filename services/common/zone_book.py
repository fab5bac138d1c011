"""Customers' billing time zones, held in every process that counts or enforces quotas.

A quota counts the customer's calendar month in its billing zone (``schemas.zones``).
The enforcement must name the month's counter before its Redis call, and the aggregator
must know which local month an event falls in, so both need the zone of any customer at
once, without a round trip per request.  Zones change rarely (an admin sets one, before
the customer's first invoice), so each process holds the map of the customers not billed
in UTC (``redis_keys.ZONES``, written by the accounts projection) and reloads it when its
version moves: a change reaches every process within ``refresh_seconds``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from schemas import redis_keys
from schemas.zones import ZoneError, zone
from services.common.logging import get_logger
from services.common.redis import UNREACHABLE
from services.common.waits import stop_task, surviving

log = get_logger("tally.zones")


class ZoneBook:
    """The map of customers billed outside UTC, as ``redis_keys.ZONES`` holds it."""

    def __init__(self, redis: Redis, refresh_seconds: float = 1.0) -> None:
        self._redis = redis
        self._refresh = refresh_seconds
        self._zones: dict[str, ZoneInfo] = {}
        self._version: bytes | str | None = None
        self._loaded = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # a poll and a change's refresh never interleave

    def zone(self, customer: str) -> ZoneInfo | None:
        """The customer's billing zone; None for UTC (and for customers not known)."""
        return self._zones.get(customer)

    async def start(self) -> None:
        """Load the zones and follow them; with Redis away, start empty (every customer in
        UTC) and load them once it answers."""
        try:
            await self.refresh()
        except UNREACHABLE as exc:
            log.warning("zones not loaded yet", error=repr(exc))
        self._task = asyncio.create_task(self._follow(), name="zone book")

    async def stop(self) -> None:
        """Stop following changes (at shutdown)."""
        if self._task is not None:
            await stop_task(self._task)

    async def refresh(self) -> None:
        """Reload the zones if their version moved since the last load."""
        async with self._lock:
            version = await self._redis.get(redis_keys.ZONES_VERSION)
            if self._loaded and version == self._version:
                return
            raw = await self._redis.hgetall(redis_keys.ZONES)
            self._zones, self._version, self._loaded = dict(_parsed(raw)), version, True

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            # Redis away: keep the zones, try again
            with surviving(log, "zones not refreshed", *UNREACHABLE, level="warning"):
                await self.refresh()


def _parsed(raw: Mapping[bytes | str, bytes | str]) -> list[tuple[str, ZoneInfo]]:
    found = []
    for customer, name in raw.items():
        try:
            tz = zone(_text(name))
        except ZoneError:  # written by an older or newer Tally: counted in UTC
            continue
        if tz is not None:
            found.append((_text(customer), tz))
    return found


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


ZoneOf = Callable[[str], ZoneInfo | None]
"""A customer's billing zone (None: UTC): ``ZoneBook.zone``, or ``in_utc``."""


def in_utc(customer: str) -> ZoneInfo | None:
    """Every customer billed in UTC: where no zones are followed (tools, tests)."""
    return None
