"""PostgreSQL: the connection pool, database creation and Alembic migrations."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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

    This overrides a method psycopg does not document (``AsyncConnection.wait``) and
    catches its private ``errors._WaitTimeout``: psycopg offers no per-exchange timeout.
    ``pyproject.toml`` pins psycopg below the next minor release for that reason;
    ``tests/integration/test_postgres_silence.py`` fails if either changes.
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
    millis = int(answer_timeout * 1000)
    return {
        "connect_timeout": connect_timeout,
        "tcp_user_timeout": millis,
        # the server gives up too: a query the client stopped waiting for does not go on
        # holding a backend while the pool opens a replacement connection
        "options": f"-c statement_timeout={millis}",
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

    A database already at the head is left alone without importing Alembic
    (``at_head``): every start of ``tally up`` migrates before any service starts, and
    Alembic with SQLAlchemy under it costs 0.3 to 0.6 s of imports to find it has
    nothing to do.  Likewise it is imported here, not at the top: only the commands that
    prepare the stores migrate."""
    if at_head(url):
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url))
    command.upgrade(config, "head")


def at_head(url: str) -> bool:
    """Is the database at the migrations' one head?  One query, no Alembic: its
    ``alembic_version`` must hold exactly the head ``head_revision`` reads from the
    scripts.  Anything else — no such table, an older or unknown revision, several
    heads, a script it cannot read — is False, and Alembic decides."""
    head = head_revision()
    if head is None:
        return False
    with psycopg.connect(url, connect_timeout=5) as conn:
        try:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        except errors.UndefinedTable:
            return False
    return [row[0] for row in rows] == [head]


def head_revision(versions: Path = MIGRATIONS / "versions") -> str | None:
    """The revision no other script revises, read from the scripts' module-level
    ``revision`` / ``down_revision`` literals (Alembic's own convention) with ``ast``;
    None when that is not exactly one, or a script does not spell them as literals."""
    revised: set[str] = set()
    revisions: set[str] = set()
    for script in versions.glob("*.py"):
        found = _literals(script, ("revision", "down_revision"))
        if found is None or not isinstance(found["revision"], str):
            return None
        revisions.add(found["revision"])
        down = found["down_revision"]
        if isinstance(down, str):
            revised.add(down)
        elif isinstance(down, tuple | list):
            revised.update(str(parent) for parent in down)
        elif down is not None:
            return None
    heads = revisions - revised
    return heads.pop() if len(heads) == 1 else None


def _literals(script: Path, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The module-level assignments of ``names`` in ``script``, each a literal; None
    when one is missing or is not a literal."""
    found: dict[str, Any] = {}
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        targets: list[ast.expr]
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in names and value is not None:
                try:
                    found[target.id] = ast.literal_eval(value)
                except ValueError:
                    return None
    return found if found.keys() == set(names) else None


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


_OPEN = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)


@asynccontextmanager
async def reading(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection for a read of one statement, in autocommit: otherwise psycopg
    sends BEGIN before the statement and the pool COMMIT when the connection returns,
    three round trips for one (a month's usage from the rollups: 1,335 reads/s → 1,882).
    The connection goes back as it came, out of autocommit, for those that need a
    transaction; one left in a transaction is rolled back first, and a broken one goes
    back broken, for the pool to discard."""
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            yield conn
        finally:
            if not conn.closed and conn.info.transaction_status in _OPEN:
                await conn.rollback()
            if not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                await conn.set_autocommit(False)
