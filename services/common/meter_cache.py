"""The catalog's meters, held in each process and reloaded when PostgreSQL says they changed.

Reading the meters from PostgreSQL on every usage read cost a fifth of the request's CPU,
and every enforcement of an unknown meter a query.  Instead every process keeps them in
memory: a trigger NOTIFYs ``tally_catalog`` on any change to ``meters`` or ``plans``
(migration 0006), one connection per process LISTENs, and each notification reloads the
meters — a meter added or changed is seen within milliseconds, without a restart.

As a safety net for a notification that never came (the listening connection lost, a
change made with triggers off), the meters are reloaded every ``max_age`` seconds anyway,
and on every reconnection.  Until a first load succeeds (PostgreSQL was away when the
process started), each read loads them itself, so the caller gets PostgreSQL's answer or
its error, as without a cache.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Meter
from services.common import catalog, postgres
from services.common.logging import get_logger
from services.common.waits import stop_task, surviving

log = get_logger("tally.meters")

CHANNEL = "tally_catalog"
MAX_RETRY_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class MeterIndex:
    """One load of the meters, looked up without copying: replaced whole, never changed."""

    all: tuple[Meter, ...]
    by_name: dict[str, Meter]
    by_type: dict[str, list[Meter]]
    version: int = 0  # the catalog version these meters are (``catalog.current``)
    counting_from: dict[str, int] = field(default_factory=dict)  # meter → first version live
    archived: dict[str, Meter] = field(default_factory=dict)
    """Meters that count no more, by name: their history is still read."""

    @classmethod
    def of(
        cls,
        meters: list[Meter],
        version: int = 0,
        counting_from: dict[str, int] | None = None,
        archived: list[Meter] | None = None,
    ) -> MeterIndex:
        by_type: dict[str, list[Meter]] = defaultdict(list)
        for meter in meters:
            by_type[meter.event_type].append(meter)
        return cls(
            tuple(meters),
            {m.name: m for m in meters},
            dict(by_type),
            version,
            counting_from or {},
            {m.name: m for m in archived or ()},
        )


class MeterCache:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        url: str,
        max_age: float,
        connect_timeout: int = 2,
        answer_timeout: float = 10.0,
    ) -> None:
        """``pool`` serves reads until the listener connects; ``url`` is where it listens,
        on a connection whose every wait is bounded (``postgres.BoundedConnection``), so
        a PostgreSQL gone silent is noticed and the listener reconnects."""
        self._pool = pool
        self._url = url
        self._connect_timeout = connect_timeout
        self._answer_timeout = answer_timeout
        self._max_age = max_age
        self._index: MeterIndex | None = None
        self._task: asyncio.Task[None] | None = None
        self._listening = False
        self._watchers: list[Callable[[], Awaitable[None]]] = []

    def on_change(self, watcher: Callable[[], Awaitable[None]]) -> None:
        """Call ``watcher`` after each notified change of the catalog (meters or plans),
        once the meters are reloaded: e.g. billing recompiles alert thresholds."""
        self._watchers.append(watcher)

    async def meters(self) -> MeterIndex:
        """The meters as last loaded (loaded now when no load has succeeded yet)."""
        if self._index is None:
            await self.refresh()
            assert self._index is not None
        return self._index

    @property
    def listening(self) -> bool:
        """Are changes being notified (else only the ``max_age`` reload sees them)?"""
        return self._listening

    def current(self) -> MeterIndex | None:
        """The meters as last loaded, without waiting (None before the first load)."""
        return self._index

    def by_type(self) -> dict[str, list[Meter]]:
        """The meters by the event type they count (none before the first load)."""
        return self._index.by_type if self._index else {}

    async def refresh(self, conn: AsyncConnection | None = None) -> None:
        """Load the meters, on ``conn`` or else on a connection of the pool."""
        if conn is None:
            async with self._pool.connection() as pooled:
                found = await catalog.current(pooled)
        else:
            found = await catalog.current(conn)
        self._index = MeterIndex.of(
            found.meters, found.version, found.counting_from, found.archived
        )

    async def start(self) -> None:
        """Load the meters (a failure is left to the first read) and start listening."""
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("meters not loaded yet", error=repr(exc))
        self._task = asyncio.create_task(self._listen_forever(), name="meter-cache")

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)

    async def _listen_forever(self) -> None:
        while True:
            # keep the last good meters; reconnect
            with surviving(log, "catalog listener failed", level="warning"):
                await self._listen()
            self._listening = False
            await asyncio.sleep(min(self._max_age, MAX_RETRY_SECONDS))

    async def _listen(self) -> None:
        """Listen first, then load: a change committed in between is notified, one
        committed before is read.  Then reload on each notification, or at ``max_age``."""
        options = postgres.connection_options(self._connect_timeout, self._answer_timeout)
        async with await postgres.bounded(self._answer_timeout).connect(
            self._url, autocommit=True, **options
        ) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            while True:
                await self.refresh(conn)
                self._listening = True
                notified = False
                async for _ in conn.notifies(timeout=self._max_age, stop_after=1):
                    notified = True
                if notified:
                    await self._tell_watchers()

    async def _tell_watchers(self) -> None:
        for watcher in self._watchers:
            try:
                await watcher()
            except Exception as exc:  # a watcher's failure must not stop the listening
                log.warning("catalog watcher failed", error=repr(exc))
