"""What the billing run reads about customers: their anchors, their subscription
history (``subscription_history``, kept by triggers on ``customers``), and every
version of every plan, so a period is rated with the plan as it stood then."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from psycopg import AsyncConnection

from schemas import zones
from schemas.plans import Plan
from services.billing.invoicing.compose import State
from services.billing.invoicing.periods import UTC_ZONE

_SUBSCRIPTIONS = """
    SELECT c.id, (coalesce(c.trial_ends_at, c.created_at) AT TIME ZONE c.timezone)::date,
           array_agg(h.at ORDER BY h.at, h.seq), array_agg(h.plan_id ORDER BY h.at, h.seq),
           array_agg(h.status ORDER BY h.at, h.seq), c.timezone
    FROM customers c JOIN subscription_history h ON h.customer_id = c.id
"""


async def exists(conn: AsyncConnection, customer: str) -> bool:
    """Whether Tally has an account for ``customer``: its invoices or credit notes, or a
    webhook endpoint made for it, are a 404 for one it has not."""
    cur = await conn.execute("SELECT 1 FROM customers WHERE id = %s", (customer,))
    return await cur.fetchone() is not None


@dataclass(frozen=True, slots=True)
class Subscription:
    customer: str
    anchor: date  # the day anniversary periods count from: trial end, else sign-up (local)
    states: tuple[State, ...]
    tz: ZoneInfo = UTC_ZONE  # the billing time zone: where periods start

    def state_at(self, instant: datetime) -> State:
        """The state in effect at ``instant`` (the first one, before the history starts)."""
        current = self.states[0]
        for state in self.states:
            if state.at > instant:
                break
            current = state
        return current


async def page(conn: AsyncConnection, after: str, limit: int) -> list[Subscription]:
    """Up to ``limit`` customers with ids after ``after``, in id order."""
    cur = await conn.execute(
        f"{_SUBSCRIPTIONS} WHERE c.id > %s GROUP BY c.id ORDER BY c.id LIMIT %s",
        (after, limit),
    )
    return [_subscription(row) for row in await cur.fetchall()]


async def one(conn: AsyncConnection, customer: str) -> Subscription | None:
    cur = await conn.execute(f"{_SUBSCRIPTIONS} WHERE c.id = %s GROUP BY c.id", (customer,))
    row = await cur.fetchone()
    return _subscription(row) if row else None


def _subscription(
    row: tuple[str, date, list[datetime], list[str], list[str], str],
) -> Subscription:
    customer, anchor, ats, plans, statuses, timezone = row
    states = tuple(State(*s) for s in zip(ats, plans, statuses, strict=True))
    return Subscription(customer, anchor, states, zones.zone_info(timezone))


class PlanBook:
    """Every version of every plan, to answer "which definition applied at this instant"."""

    def __init__(self, versions: dict[str, list[tuple[datetime, Plan]]]) -> None:
        self._versions = versions
        self._changed = {pid: [at for at, _ in rows] for pid, rows in versions.items()}

    @property
    def versions(self) -> Mapping[str, Sequence[tuple[datetime, Plan]]]:
        """Each plan's versions, oldest first, with when each was saved."""
        return self._versions

    def at(self, plan_id: str, instant: datetime) -> Plan:
        """The version saved last before ``instant`` (the first version, if none was)."""
        index = bisect_left(self._changed[plan_id], instant)
        return self._versions[plan_id][max(index - 1, 0)][1]


async def plan_book(conn: AsyncConnection) -> PlanBook:
    cur = await conn.execute(
        "SELECT plan_id, changed_at, definition FROM plan_versions ORDER BY plan_id, version"
    )
    versions: dict[str, list[tuple[datetime, Plan]]] = defaultdict(list)
    for plan_id, changed_at, definition in await cur.fetchall():
        versions[plan_id].append((changed_at, Plan.model_validate(definition)))
    return PlanBook(dict(versions))
