"""PostgreSQL gone silent on an open connection (the fault proxy's blackhole: bytes are
taken, nothing comes back — a frozen server, or a dead link behind something that still
acknowledges): every wait is bounded by ``postgres_answer_timeout``, the connection is
dropped, and pool and meter cache recover once PostgreSQL answers again.

A plain psycopg connection, for comparison, waits without end: that is the gap closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest

from services.common import postgres
from services.common.meter_cache import MeterCache
from services.common.problems import unavailable_store
from tests.faults import FaultProxy
from tests.support import wait_for

ANSWER = 1.0  # seconds, the bound under test
SLACK = 1.0


@pytest.fixture
def pg_proxy(database_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(database_url)
    with FaultProxy(parts.port or 5432, parts.hostname or "127.0.0.1") as proxy:
        yield proxy


def behind(database_url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(database_url)
    user = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{user}@{proxy.address}").geturl()


async def test_a_plain_connection_waits_without_end_when_postgresql_goes_silent(
    database_url: str, pg_proxy: FaultProxy
) -> None:
    async with await psycopg.AsyncConnection.connect(behind(database_url, pg_proxy)) as conn:
        await conn.execute("SELECT 1")
        pg_proxy.blackhole()
        query = asyncio.ensure_future(conn.execute("SELECT 1"))
        done, _ = await asyncio.wait({query}, timeout=ANSWER * 3)
        assert not done  # still waiting at three times the bound
        # Not cancelled: psycopg would send a cancel request through the silent proxy and
        # wait 5 s for it.  Restoring closes the held connection, which ends the wait.
        pg_proxy.restore()
        with pytest.raises(psycopg.OperationalError):
            await query


async def test_a_query_on_a_connection_gone_silent_fails_within_the_bound_then_the_pool_recovers(
    database_url: str, pg_proxy: FaultProxy
) -> None:
    pool = await postgres.open_pool(behind(database_url, pg_proxy), answer_timeout=ANSWER)
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            pg_proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as failed:
                await conn.execute("SELECT 1")
            took = time.monotonic() - started
        print(f"silent mid-query: failed after {took:.2f}s")
        assert ANSWER <= took < ANSWER + SLACK
        assert unavailable_store(failed.value) == "postgresql"  # a request's 503
        assert conn.closed  # dropped, never handed out again

        started = time.monotonic()  # a new request: no connection to be had, bounded too
        with pytest.raises(psycopg.OperationalError):
            async with pool.connection() as again:
                await again.execute("SELECT 1")
        assert time.monotonic() - started < 2 + 2 + SLACK  # connect 2 s, pool wait 2 s

        pg_proxy.restore()
        async with pool.connection(timeout=10) as back:
            assert await (await back.execute("SELECT 1")).fetchone() == (1,)
    finally:
        pg_proxy.restore()
        await pool.close()


async def test_the_meter_listener_notices_silence_and_listens_again_when_postgresql_answers(
    database_url: str, pg_proxy: FaultProxy
) -> None:
    url = behind(database_url, pg_proxy)
    pool = await postgres.open_pool(url, answer_timeout=ANSWER)
    meters = MeterCache(pool, url, max_age=1.0, answer_timeout=ANSWER)
    await meters.start()
    try:
        await asyncio.to_thread(wait_for, lambda: meters.listening, 10, "listening")
        pg_proxy.blackhole()
        started = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: not meters.listening, 10, "silence noticed")
        noticed = time.monotonic() - started
        print(f"meter listener: silence noticed after {noticed:.2f}s")
        assert noticed < 1.0 + ANSWER + SLACK  # the LISTEN wait, then the reload's bound
        pg_proxy.restore()
        await asyncio.to_thread(wait_for, lambda: meters.listening, 15, "listening again")
        assert (await meters.meters()).by_name  # reloaded on the new connection
    finally:
        await meters.stop()
        await pool.close()
