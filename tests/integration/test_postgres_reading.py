"""``postgres.reading``: a one-statement read in autocommit, the connection given back as
it came — the pool's other users write in transactions that must not turn into
statement-by-statement commits."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import pq

from services.common import postgres


async def test_a_read_opens_no_transaction_and_the_connection_goes_back_as_it_came(
    database_url: str,
) -> None:
    pool = await postgres.open_pool(database_url, max_size=1)
    try:
        async with postgres.reading(pool) as conn:
            await conn.execute("SELECT 1")
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE  # no BEGIN
        async with pool.connection() as conn:  # the same connection, the pool's one
            assert not conn.autocommit
            await conn.execute("SELECT 1")
            assert conn.info.transaction_status == pq.TransactionStatus.INTRANS
    finally:
        await pool.close()


async def test_a_failed_read_gives_back_a_connection_that_still_works(database_url: str) -> None:
    pool = await postgres.open_pool(database_url, max_size=1)
    try:
        with pytest.raises(psycopg.errors.UndefinedTable):
            async with postgres.reading(pool) as conn:
                await conn.execute("SELECT * FROM no_such_table")
        async with pool.connection() as conn:
            assert not conn.autocommit
            assert (await (await conn.execute("SELECT 2")).fetchone()) == (2,)
    finally:
        await pool.close()


async def test_a_transaction_begun_inside_is_rolled_back_and_autocommit_restored(
    database_url: str,
) -> None:
    pool = await postgres.open_pool(database_url, max_size=1)
    try:
        async with postgres.reading(pool) as conn:
            await conn.execute("BEGIN")
            await conn.execute("SELECT 1")
        async with pool.connection() as conn:
            assert not conn.autocommit
    finally:
        await pool.close()
