"""``postgres.reading``: a one-statement read in autocommit, the connection given back as
it came — the pool's other users write in transactions that must not turn into
statement-by-statement commits."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import pq
from psycopg_pool import AsyncConnectionPool

from services.common import postgres


@pytest.fixture
async def one(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    """A pool of one connection: what ``reading`` gives back is what the next user gets."""
    pool = await postgres.open_pool(database_url, max_size=1)
    yield pool
    await pool.close()


async def test_a_read_opens_no_transaction_and_the_connection_goes_back_as_it_came(
    one: AsyncConnectionPool,
) -> None:
    async with postgres.reading(one) as conn:
        await conn.execute("SELECT 1")
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE  # no BEGIN
    async with one.connection() as conn:
        assert not conn.autocommit
        await conn.execute("SELECT 1")
        assert conn.info.transaction_status == pq.TransactionStatus.INTRANS


async def test_a_failed_read_gives_back_a_connection_that_still_works(
    one: AsyncConnectionPool,
) -> None:
    with pytest.raises(psycopg.errors.UndefinedTable):
        async with postgres.reading(one) as conn:
            await conn.execute("SELECT * FROM no_such_table")
    async with one.connection() as conn:
        assert not conn.autocommit
        assert (await (await conn.execute("SELECT 2")).fetchone()) == (2,)


async def test_a_transaction_begun_inside_is_rolled_back_and_autocommit_restored(
    one: AsyncConnectionPool,
) -> None:
    async with postgres.reading(one) as conn:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
    async with one.connection() as conn:
        assert not conn.autocommit
