"""``postgres.migrate`` skips Alembic only when the database is at the head: a database
one migration behind is still migrated."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from psycopg import sql

from services.common import postgres
from tests.conftest import ADMIN_URL


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"tally_test_skip_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield urlsplit(ADMIN_URL)._replace(path=f"/{name}").geturl()
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def version(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]


def test_only_a_database_at_the_head_skips(empty_database: str) -> None:
    head = postgres.head_revision()
    assert head is not None
    assert not postgres.at_head(empty_database)  # no alembic_version yet
    config = Config()
    config.set_main_option("script_location", str(postgres.MIGRATIONS))
    config.set_main_option("sqlalchemy.url", postgres.sqlalchemy_url(empty_database))
    command.upgrade(config, "head-1")  # one migration behind
    assert version(empty_database) != [head]
    assert not postgres.at_head(empty_database)
    postgres.migrate(empty_database)
    assert version(empty_database) == [head]
    assert postgres.at_head(empty_database)
