"""The stores a benchmark runs against: its own, never the user's.

A benchmark writes thousands of customers, keys, counters and invoices, so it never
runs on what ``DATABASE_URL``, ``REDIS_URL`` (or ``.env``) point at:

- PostgreSQL: a database of its own, ``tally_bench_<random>``, created on the server
  ``TALLY_BENCH_DATABASE_URL`` names (default the local one), migrated as the tests'
  databases are, and dropped at the end, on error too;
- Redis: the database ``TALLY_BENCH_REDIS_URL`` names (default db 13), used only when it
  is empty or marked (``tally:bench:owner``) by an earlier benchmark; anything else is
  refused, and a database is flushed only when a benchmark marked it;
- files (chDB, Tansu's log, the services' logs): a temporary directory, removed at the end.

The services under test are started with only these stores in their environment: every
store and ``TALLY_*`` variable of the user's is taken out of this process's environment,
and they run in the temporary directory, where no ``.env`` is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import redis as sync_redis
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import Catalog
from services.api.catalog import store as catalog_store
from services.common import postgres

REDIS_VARIABLE = "TALLY_BENCH_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
DATABASE_VARIABLE = "TALLY_BENCH_DATABASE_URL"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
OWNER_KEY = "tally:bench:owner"
# What a user's environment could point the services at: their stores, Stripe, and any
# ``TALLY_*`` setting (``TALLY_DATABASE_URL`` is an alias of ``DATABASE_URL``).
USER_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "CLICKHOUSE_URL",
    "STRIPE_API_KEY",
    "STRIPE_WEBHOOK_SECRET",
)
ROOT = Path(__file__).resolve().parents[1]


class Refused(SystemExit):
    """A store the benchmark will not use; the message says why and what to do."""


@dataclass(frozen=True)
class Stores:
    database_url: str
    redis_url: str
    data_dir: Path

    def env(self) -> dict[str, str]:
        """The environment that points a ``tally`` process at these stores, and only them."""
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "TALLY_DATA_DIR": str(self.data_dir),
        }


def redis_refusal(url: str, keys: int, owner: bytes | str | None) -> str | None:
    """Why a Redis database holding ``keys`` keys, marked ``owner`` (or not), is not
    the benchmark's to use; ``None`` when it is (empty, or marked by a benchmark)."""
    if keys == 0 or owner is not None:
        return None
    return (
        f"refusing to run: Redis {url} holds {keys} key(s) and is not a benchmark's "
        f"(no {OWNER_KEY!r} key). Benchmarks write and then flush their Redis database, "
        f"so they use only an empty one or one an earlier benchmark marked. Point "
        f"{REDIS_VARIABLE} at an empty database (default {DEFAULT_REDIS_URL})."
    )


@contextlib.contextmanager
def bench_redis(url: str | None = None) -> Iterator[str]:
    """The benchmark's Redis database, marked as the benchmark's while it runs and
    left empty at the end; refused (``Refused``) when it holds someone else's keys."""
    url = url or os.environ.get(REDIS_VARIABLE, DEFAULT_REDIS_URL)
    client = sync_redis.Redis.from_url(url)
    try:
        keys, owner = client.dbsize(), client.get(OWNER_KEY)
        refusal = redis_refusal(url, keys, owner)
        if refusal:
            raise Refused(refusal)
        if keys:
            client.flushdb()  # what an earlier benchmark (the marker says so) left behind
        mark = f"bench pid {os.getpid()} {uuid.uuid4().hex[:8]} at {time.time():.0f}"
        client.set(OWNER_KEY, mark)
        try:
            yield url
        finally:
            if client.get(OWNER_KEY) == mark.encode():
                client.flushdb()
    finally:
        client.close()


@contextlib.contextmanager
def bench_database(load: Catalog | None = None, server: str | None = None) -> Iterator[str]:
    """A fresh PostgreSQL database, migrated and with ``load`` (a catalog) loaded;
    dropped at the end whatever happened."""
    admin = server or os.environ.get(DATABASE_VARIABLE, DEFAULT_DATABASE_URL)
    name = f"tally_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = urlsplit(admin)._replace(path=f"/{name}").geturl()
        postgres.migrate(url)
        if load is not None:
            asyncio.run(_load(url, load))
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def _load(url: str, load: Catalog) -> None:
    async with AsyncConnectionPool(url, open=False) as pool:
        await catalog_store.load(pool, load)


@contextlib.contextmanager
def data_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def forget_user_settings(environ: MutableMapping[str, str] = os.environ) -> None:
    """Take the user's store and ``TALLY_*`` variables out of this process's environment
    (the services under test inherit it), keeping the benchmark's own."""
    for name in list(environ):
        upper = name.upper()
        if upper in USER_VARIABLES or (
            upper.startswith("TALLY_") and not upper.startswith("TALLY_BENCH_")
        ):
            del environ[name]


@contextlib.contextmanager
def working_in(path: Path) -> Iterator[None]:
    """Run from ``path`` (so processes started meanwhile read no ``.env``), importing
    this checkout's code."""
    before = Path.cwd()
    python_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), python_path]))
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
        if python_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = python_path


@contextlib.contextmanager
def bench_stores(prefix: str) -> Iterator[Stores]:
    """All of the above: the stores a benchmark that starts Tally's services uses."""
    forget_user_settings()
    with (
        bench_redis() as redis_url,
        data_dir(prefix) as files,
        bench_database(Catalog.default()) as database_url,
        working_in(files),
    ):
        yield Stores(database_url, redis_url, files)
