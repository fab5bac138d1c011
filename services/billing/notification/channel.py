"""What one attempt to carry a notification over one channel came to.

The delivery worker records every ``Attempt`` in ``delivery_attempts`` and decides from
it whether the delivery succeeded, is retried on the schedule, or ends.  Both channels
(webhook, email) answer with this one shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from schemas.notifications import Notification


@dataclass(frozen=True, slots=True)
class Attempt:
    ok: bool
    status: int | None  # the HTTP status (webhook) or the SMTP reply code (email)
    response: str  # the start of what came back (at most 1 KiB), for the delivery log
    error: str | None  # why nothing usable came back (timeout, refused, TLS, ...)
    duration_ms: int
    gone: bool = False  # the receiver says it is gone for good (HTTP 410): disable it
    retry_after: float | None = None  # seconds the receiver asked us to wait (Retry-After)
    permanent: bool = False  # retrying cannot help (SMTP 5xx for this recipient): stop


class Mailer(Protocol):
    """The email channel as the delivery worker sees it (``notification.email``)."""

    async def send(
        self, notification: Notification, to: str, *, company: str | None = None
    ) -> Attempt: ...
