"""Who decides a request for ``TallyMiddleware``: the seam where local decisions slot in.

The middleware only asks a ``Decider`` for a ``Decision``.  ``RemoteDecider`` asks Tally
for every request (one pipelined round trip, see ``tally_sdk.pipelined``); a decider
that spends leases held locally (design decision 8) can replace it without the
middleware changing, falling back to Tally when it holds none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tally_sdk.client import Mode, Tally
from tally_sdk.decision import Decision


@dataclass(frozen=True, slots=True)
class Ask:
    """One request to decide: the caller's key, what it uses, and the event that will
    meter it (and settles a reservation)."""

    key: str
    meter: str
    endpoint: str
    event_id: str
    mode: Mode = "reserve"
    client_ip: str | None = None
    end_user: str | None = None  # for rate limits scoped per end user


class Decider(Protocol):
    async def decide(self, ask: Ask) -> Decision:
        """The decision, or ``TallyError`` when none can be had."""
        ...


class RemoteDecider:
    """Every request decided by Tally itself."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def decide(self, ask: Ask) -> Decision:
        if ask.mode == "reserve":
            return await self.tally.reserve(
                ask.event_id,
                key=ask.key,
                meter=ask.meter,
                endpoint=ask.endpoint,
                client_ip=ask.client_ip,
                end_user=ask.end_user,
            )
        return await self.tally.check(
            key=ask.key,
            meter=ask.meter,
            endpoint=ask.endpoint,
            client_ip=ask.client_ip,
            end_user=ask.end_user,
        )
