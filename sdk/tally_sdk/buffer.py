"""The bounded queue between ``emit`` and the background sender.

Bounded, because an emitter that buffers without limit while Tally is down turns an
outage of Tally into an out-of-memory crash of the service it meters.  When full, it
raises ``BufferFull`` by default; ``drop_oldest`` is for callers who prefer losing old
usage to refusing new work.  Events are numbered in the order they arrive (the first
ever is 0), so that ``flush`` can tell when every event emitted before it has been dealt
with, however many arrived since; the numbers are counted, not stored with each event,
and the time an event was queued is kept for the oldest only: ``put`` runs for every
request a metered API serves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any, Literal

from tally_sdk.errors import BufferFull

Overflow = Literal["raise", "drop_oldest"]
Event = dict[str, Any]


class EventBuffer:
    def __init__(self, capacity: int, overflow: Overflow, on_drop: Callable[[Event], None]) -> None:
        if capacity < 1:
            raise ValueError("the buffer needs room for at least one event")
        self.capacity = capacity
        self.overflow = overflow
        self._on_drop = on_drop
        self._events: deque[Event] = deque()
        self.head = 0
        """The number of the oldest event waiting (of the next to come when none is)."""
        self.oldest_at = 0.0
        """When the oldest event waiting was queued (``time.monotonic``), or earlier once
        it was dropped to make room; after a ``take`` that leaves some, when it took:
        the rest then leave full or ``max_delay`` after it, not at once in a small batch
        of their own (they arrived while the batch ahead filled or was being delivered,
        so this is at most that much late)."""

    def __len__(self) -> int:
        return len(self._events)

    @property
    def next_seq(self) -> int:
        """The number the next event put will have."""
        return self.head + len(self._events)

    def put(self, event: Event) -> int:
        """Queue ``event``; how many are waiting now."""
        events = self._events
        if len(events) >= self.capacity:
            self._make_room()
        events.append(event)
        waiting = len(events)
        if waiting == 1:
            self.oldest_at = monotonic()
        return waiting

    def take(self, count: int) -> list[Event]:
        taken = min(count, len(self._events))
        self.head += taken
        if taken < len(self._events):
            self.oldest_at = monotonic()
        return [self._events.popleft() for _ in range(taken)]

    def _make_room(self) -> None:
        if self.overflow == "raise":
            raise BufferFull(
                f"{self.capacity} events are waiting to be sent to Tally; this one was not buffered"
            )
        self.head += 1
        self._on_drop(self._events.popleft())
