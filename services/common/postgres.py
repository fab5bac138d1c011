"""PostgreSQL: the connection pool, database creation and Alembic migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import psycopg
from psycopg import errors, pq, sql, waiting
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

MIGRATIONS = Path(__file__).resolve().parents[2] / "infra" / "migrations"
RV = TypeVar("RV")
# libpq's TCP keepalives: a peer that stops acknowledging (a dead host, a cut link) is
# found in idle + interval * count seconds even on a connection waiting for nothing.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


class BoundedConnection(psycopg.AsyncConnection[Any]):
    """A connection on which no exchange waits longer than ``answer_timeout`` seconds.

    psycopg waits for PostgreSQL's answer without limit, and the pool's timeouts cover
    only getting a connection: a server that stops answering mid-query (frozen, or
    behind a link that still takes bytes) would hold the request, or the loop, for
    ever, and TCP cannot tell (the peer's kernel acknowledges). Every network wait of
    psycopg goes through ``wait``; given no timeout of its own it gets this one, and a
    connection that ran out of it is closed (its protocol state is unknown) — the pool
    then replaces it — and the caller gets an ``OperationalError`` without SQLSTATE:
    503 store-unavailable for a request, a logged retry for a loop.
    """

    answer_timeout: ClassVar[float | None] = None

    async def wait(
        self,
        gen: PQGen[RV],
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109 -- psycopg's signature
    ) -> RV:
        """psycopg's ``wait``, bounded; and cancelled mid-exchange (a request given up,
        a process stopping), the connection is closed at once.  psycopg would first ask
        the server to cancel the query, on a new connection, and wait up to 5 s for
        each step: with PostgreSQL hung, a cancelled task took up to 10 s to end, and a
        SIGTERM ran into the shutdown bound."""
        bound = timeout if timeout is not None else self.answer_timeout
        try:
            return await waiting.wait_async(gen, self.pgconn.socket, interval, bound)
        except asyncio.CancelledError:
            if self.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
                self.pgconn.finish()  # mid-exchange: unusable; the pool replaces it
            raise
        except errors._WaitTimeout:
            if timeout is not None:  # the caller's own (LISTEN's wait for notifies)
                raise
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"PostgreSQL did not answer within {bound:g} s; connection closed"
            ) from None


def bounded(answer_timeout: float) -> type[BoundedConnection]:
    """The connection class whose exchanges are bounded by ``answer_timeout``."""
    return type("BoundedConnection", (BoundedConnection,), {"answer_timeout": answer_timeout})


def connection_options(connect_timeout: int, answer_timeout: float) -> dict[str, Any]:
    """libpq options that bound connecting and, for a peer that stops acknowledging,
    every wait (``tcp_user_timeout``, in ms; keepalives for idle connections)."""
    return {
        "connect_timeout": connect_timeout,
        "tcp_user_timeout": int(answer_timeout * 1000),
        **KEEPALIVES,
    }


def ensure_database(url: str) -> None:
    """Create the database named in ``url`` if the server does not have it yet.

    Lets ``tally up`` run against a fresh PostgreSQL with nothing prepared.
    """
    params = conninfo_to_dict(url)
    name = str(params.get("dbname") or "")
    try:
        psycopg.connect(url, connect_timeout=5).close()
        return
    except psycopg.OperationalError as exc:
        if f'database "{name}" does not exist' not in str(exc):
            raise
    admin = make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision.

    Alembic (and SQLAlchemy under it) is imported here, not at the top: only the
    commands that prepare the stores migrate, and importing it cost every other process
    0.3 to 0.6 s of start-up — time an aggregator restarted is not counting."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url))
    command.upgrade(config, "head")


def sqlalchemy_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return url


async def open_pool(
    url: str,
    max_size: int = 10,
    *,
    connect_timeout: int = 2,
    pool_timeout: float = 2.0,
    answer_timeout: float = 10.0,
) -> AsyncConnectionPool:
    """A pool whose every wait is bounded: a connection is opened within
    ``connect_timeout`` seconds, and a request waits at most ``pool_timeout`` for one (then
    ``PoolTimeout``, answered 503), so a PostgreSQL that is down or hangs costs a request
    seconds, not minutes.  It opens without waiting for a first connection: a process
    started while PostgreSQL is away serves (503 for what needs it, ``/readyz`` says
    why) and recovers when PostgreSQL answers again.  On an open connection, every
    exchange is bounded by ``answer_timeout`` (``BoundedConnection``)."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        connection_class=bounded(answer_timeout),
        kwargs=connection_options(connect_timeout, answer_timeout),
        timeout=pool_timeout,
        open=False,
    )
    await pool.open(wait=False)
    return cast(AsyncConnectionPool, pool)  # its connections are AsyncConnections
