"""The lock that orders writes of one customer's Redis projection.

PostgreSQL is the truth and Redis holds a copy of each account for the enforcement
script.  Two writers of one copy could otherwise cross: a decision that projects a
customer on demand reads the row, a plan change commits and projects the new row, and
then the first writer's stale copy lands on top of it, to stay until the next change.

Every writer takes this lock in the transaction that reads what it writes and holds it
until the Redis write is done (the lock ends with the transaction).  A change commits
before its own projection takes the lock, so the projection that takes the lock last
read a state at least as new as every change before it, and its write lands last.  A
writer that only drops the copy (so that the next decision re-projects it) takes the
lock before it commits, and drops the copy after.
"""

from __future__ import annotations

from psycopg import AsyncConnection

LOCK_CLASS = 0x7A11  # the advisory-lock key space of Tally's projections


async def lock_projection(conn: AsyncConnection, customer: str) -> None:
    """Wait for, then hold until this transaction ends, ``customer``'s projection lock.

    Call it inside a transaction: in autocommit mode the lock would end at once.  The
    key is a 32-bit hash of the id; two customers sharing one only wait for each other.
    """
    await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, customer))
