"""The notifier assembled: intake and sender sharing one wake-up, and their routes.

Billing's ``service.start`` builds one and runs ``intake.run`` and ``sender.run`` as
background tasks; other parts of billing hook in with ``intake.listen``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import APIRouter
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from services.billing.notification import endpoint_routes, log_routes
from services.billing.notification import sender as sending
from services.billing.notification.access import Access
from services.billing.notification.channel import Mailer
from services.billing.notification.intake import Intake
from services.billing.notification.sender import Sender
from services.common.auth import Authenticator
from services.common.settings import Settings


@dataclass
class Notifier:
    intake: Intake
    sender: Sender
    routers: list[APIRouter] = field(default_factory=list)


def notifier(
    settings: Settings,
    pool: AsyncConnectionPool,
    redis: Redis,
    auth: Authenticator,
    mailer: Mailer | None = None,
) -> Notifier:
    wake = asyncio.Event()
    intake = Intake(pool, redis, wake, mailer is not None, settings.notification_consumer)
    sender = Sender(pool, sending.policy(settings), wake, mailer)
    access = Access(auth)
    return Notifier(
        intake,
        sender,
        [
            endpoint_routes.router(pool, access, intake, settings),
            log_routes.router(pool, access, wake),
        ],
    )
