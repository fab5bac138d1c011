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


async def open_pool(url: str, max_size: int = 10) -> AsyncConnectionPool:
    pool = AsyncConnectionPool(url, min_size=1, max_size=max_size, open=False)
    await pool.open(wait=True, timeout=10)
    return pool
