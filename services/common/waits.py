"""Waiting for an ``asyncio.Event`` with a time limit, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` returns the inner result when a cancellation arrives
in the same loop turn as the awaited thing finishes, and the cancellation is lost
(CPython gh-86296, fixed in 3.12). A background loop that waits on an event which is set
just as the loop is stopped then never stops, and its process (or a test) hangs at
shutdown. ``asyncio.timeout`` does not have the flaw.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """True when ``event`` is set within ``seconds``, False when the time runs out."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
