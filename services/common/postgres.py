"""PostgreSQL: the connection pool, database creation and Alembic migrations."""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

MIGRATIONS = Path(__file__).resolve().parents[2] / "infra" / "migrations"


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
    """Bring the schema to the newest Alembic revision."""
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
    url: str, max_size: int = 10, *, connect_timeout: int = 2, pool_timeout: float = 2.0
) -> AsyncConnectionPool:
    """A pool whose every wait is bounded: a connection is opened within
    ``connect_timeout`` seconds, and a request waits at most ``pool_timeout`` for one (then
    ``PoolTimeout``, answered 503), so a PostgreSQL that is down or hangs costs a request
    seconds, not minutes.  It opens without waiting for a first connection: a process
    started while PostgreSQL is away serves (503 for what needs it, ``/readyz`` says
    why) and recovers when PostgreSQL answers again."""
    pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"connect_timeout": connect_timeout},
        timeout=pool_timeout,
        open=False,
    )
    await pool.open(wait=False)
    return pool
