"""The bounded queue between ``emit`` and the background sender.

Bounded, because an emitter that buffers without limit while Tally is down turns an
outage of Tally into an out-of-memory crash of the service it meters.  When full, it
raises ``BufferFull`` by default; ``drop_oldest`` is for callers who prefer losing old
usage to refusing new work.  Entries are numbered so that ``flush`` can tell when every
event emitted before it has been dealt with, however many arrived since.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from tally_sdk.errors import BufferFull

Overflow = Literal["raise", "drop_oldest"]


class Entry(NamedTuple):
    seq: int
    queued_at: float
    event: dict[str, Any]


_entry = tuple.__new__  # an Entry from a tuple in one C call: the per-event path


class EventBuffer:
    def __init__(self, capacity: int, overflow: Overflow, on_drop: Callable[[Entry], None]) -> None:
        if capacity < 1:
            raise ValueError("the buffer needs room for at least one event")
        self.capacity = capacity
        self.overflow = overflow
        self._on_drop = on_drop
        self._entries: deque[Entry] = deque()
        self.next_seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, event: dict[str, Any]) -> int:
        """Queue ``event``; how many are waiting now."""
        if len(self._entries) >= self.capacity:
            if self.overflow == "raise":
                raise BufferFull(
                    f"{self.capacity} events are waiting to be sent to Tally; "
                    "this one was not buffered"
                )
            self._on_drop(self._entries.popleft())
        self._entries.append(_entry(Entry, (self.next_seq, time.monotonic(), event)))
        self.next_seq += 1
        return len(self._entries)

    def take(self, count: int) -> list[Entry]:
        taken = min(count, len(self._entries))
        return [self._entries.popleft() for _ in range(taken)]

    def oldest(self) -> Entry | None:
        return self._entries[0] if self._entries else None
