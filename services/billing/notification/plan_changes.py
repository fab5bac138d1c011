"""Re-telling plan changes whose ``plan.changed`` a crash lost.

The api (admin API, an ended trial) and billing (a Stripe event) publish ``plan.changed``
after the commit that changed the plan, so a crash in between lost it.  Every change is
also a row of ``subscription_history`` (written by a trigger, in the same commit), with
who made it (``source``) and its own id (``change_ref``: a Stripe event id or
``trial_end``; none for an admin change, whose id is its time).  The lifecycle pass reads
the changes of the last ``WINDOW`` and publishes each through ``publish_once`` under the
id the immediate publish used (``schemas.notifications.plan_changed``): a change already
told is not told again, a lost one is told once.

``WINDOW`` is shorter than any producer's ``publish_once`` memory (7 days for the api,
10 for Stripe's), so the marker of an immediate publish outlives every re-tell of it.
A row without a source (made before it was recorded, or by SQL by hand) is not re-told:
the id its immediate publish used cannot be known.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from psycopg import AsyncConnection

from schemas.notifications import Notification, moment, plan_changed

WINDOW = timedelta(days=2)
REMEMBER = timedelta(days=7)

_CHANGES = """
    SELECT customer_id, at, plan_id, before, source, change_ref FROM (
        SELECT customer_id, at, plan_id, source, change_ref,
               lag(plan_id) OVER (PARTITION BY customer_id ORDER BY seq) AS before
        FROM subscription_history
        WHERE customer_id IN (SELECT customer_id FROM subscription_history WHERE at >= %s)
    ) changes
    WHERE at >= %s AND source IS NOT NULL AND before IS NOT NULL AND before <> plan_id
    ORDER BY at, customer_id
"""


async def recent(conn: AsyncConnection, since: datetime) -> list[Notification]:
    """The ``plan.changed`` of every plan change recorded since ``since``."""
    cur = await conn.execute(_CHANGES, (since, since))
    found = []
    for customer, at, after, before, source, ref in await cur.fetchall():
        note = plan_changed(customer, before, after, source, ref or moment(at), at)
        if note is not None:
            found.append(note)
    return found
