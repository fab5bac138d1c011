"""The SDK's lean decision client (``tally_sdk.pipelined``, ``Tally.check``/``reserve``)
over real sockets, against a scripted stand-in Tally (``tests.sdk_fake``): answers
matched to requests under concurrency, connections dropped mid-flight, Tally down or
hung.  The decisions themselves are tested against a real Tally in
``tests/e2e/test_sdk_middleware.py``."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import pytest
import uvloop
from tally_sdk import Tally, Unavailable
from tally_sdk.pipelined import Dropped, Pool

from tests.sdk_fake import Answer, Seen, fake_tally, reply
from tests.support import blackhole


def enforce_request(ident: int) -> bytes:
    body = json.dumps({"mode": "check", "id": ident}).encode()
    head = f"POST /v1/enforce HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def echo_slowly(seen: Seen) -> Answer | None:
    """Answers that take a random while, each naming the request it answers."""
    await asyncio.sleep(random.uniform(0, 0.003))
    return reply(200, {"id": seen.json()["id"]})


async def test_concurrent_requests_each_get_their_own_answer_over_few_connections() -> None:
    async with fake_tally(echo_slowly) as fake:
        pool = Pool("127.0.0.1", fake.port, size=3, depth=4)
        try:
            replies = await asyncio.gather(
                *(pool.request(enforce_request(n), within=10) for n in range(300))
            )
        finally:
            pool.close()
    assert [json.loads(r.body)["id"] for r in replies] == list(range(300))
    assert fake.connections == 3  # 300 requests in flight, at most `size` connections
    per_connection = {n: sum(s.connection == n for s in fake.seen) for n in (1, 2, 3)}
    assert sum(per_connection.values()) == 300 and min(per_connection.values()) > 1


async def test_a_connection_dropped_mid_flight_fails_over_without_mixing_answers() -> None:
    async def drop_the_first_connection_after_one_answer(seen: Seen) -> Answer | None:
        if seen.connection == 1 and sum(s.connection == 1 for s in fake.seen) > 1:
            return None  # closes, with requests still waiting on this connection
        return await echo_slowly(seen)

    async with fake_tally(drop_the_first_connection_after_one_answer) as fake:
        pool = Pool("127.0.0.1", fake.port, size=1, depth=100)
        try:
            replies = await asyncio.gather(
                *(pool.request(enforce_request(n), within=10) for n in range(20))
            )
        finally:
            pool.close()
    assert [json.loads(r.body)["id"] for r in replies] == list(range(20))
    on_first = [s.json()["id"] for s in fake.seen if s.connection == 1]
    assert len(on_first) == 2 and fake.connections >= 2  # one answered, one dropped
    resent = [s.json()["id"] for s in fake.seen if s.connection != 1]
    assert on_first[1] in resent  # the unanswered request went again


async def test_a_connection_that_keeps_dropping_fails_the_request_after_one_retry() -> None:
    async def never_answer(seen: Seen) -> Answer | None:
        return None

    async with fake_tally(never_answer) as fake:
        pool = Pool("127.0.0.1", fake.port)
        try:
            with pytest.raises(Dropped):
                await pool.request(enforce_request(1), within=10)
        finally:
            pool.close()
    assert len(fake.seen) == 2  # the request, and its one retry


async def test_decisions_carry_key_address_and_answer_through_the_client() -> None:
    async with fake_tally() as fake, Tally(fake.url, "svc-token", source="t") as tally:
        decisions = await asyncio.gather(
            *(tally.reserve(f"e{n}", key=f"key-{n}", client_ip="203.0.113.9") for n in range(50)),
            tally.check(customer="cus_9", endpoint="/v1/x"),
        )
    assert all(d.allowed and d.customer == "cus_1" for d in decisions)
    assert decisions[0].headers == {"RateLimit": '"p";r=9;t=1'}
    by_event = {s.json().get("event", {}).get("id"): s for s in fake.seen}
    assert by_event["e7"].headers["authorization"] == "Bearer key-7"
    assert by_event["e7"].headers["x-forwarded-for"] == "203.0.113.9"
    assert by_event["e7"].json() == {
        "mode": "reserve",
        "meter": "api_calls",
        "quantity": "1",
        "event": {"source": "t", "id": "e7"},
    }
    assert by_event[None].headers["authorization"] == "Bearer svc-token"
    assert by_event[None].json()["customer"] == "cus_9"


async def test_a_key_with_a_line_break_is_refused_before_sending() -> None:
    async with fake_tally() as fake, Tally(fake.url, "svc-token") as tally:
        with pytest.raises(ValueError, match="line breaks"):
            await tally.check(key="k\r\nX-Evil: 1")
    assert fake.seen == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_tally_fails_at_once_and_keeps_failing_cheaply() -> None:
    async with Tally(f"http://127.0.0.1:{closed_port()}", "t", enforce_timeout=5) as tally:
        started = time.perf_counter()
        for _ in range(50):
            with pytest.raises(Unavailable):
                await tally.check(customer="cus_1")
        elapsed = time.perf_counter() - started
    assert elapsed < 1  # refused connections, then the pool's pause: not 50 x 5 s


async def test_a_hung_tally_fails_after_the_enforce_timeout_and_frees_the_connection() -> None:
    with blackhole() as port:
        async with Tally(f"http://127.0.0.1:{port}", "t", enforce_timeout=0.2) as tally:
            started = time.perf_counter()
            results = await asyncio.gather(
                *(tally.check(customer="cus_1") for _ in range(10)), return_exceptions=True
            )
            elapsed = time.perf_counter() - started
            assert all(isinstance(r, Unavailable) for r in results)
            assert 0.2 <= elapsed < 2
            assert tally._pool._open == [] or all(c.closed for c in tally._pool._open)


def test_the_pool_runs_on_uvloop_as_the_apps_behind_uvicorn_do() -> None:
    """uvloop's transports are not asyncio's classes (the pool once refused them)."""

    async def decide() -> list[int]:
        async with fake_tally(echo_slowly) as fake:
            pool = Pool("127.0.0.1", fake.port)
            try:
                replies = await asyncio.gather(
                    *(pool.request(enforce_request(n), within=10) for n in range(20))
                )
            finally:
                pool.close()
        return [json.loads(r.body)["id"] for r in replies]

    assert uvloop.run(decide()) == list(range(20))


def test_a_tally_that_closes_every_connection_fails_requests_without_spinning() -> None:
    """Run in a thread of its own: a pool that spun without yielding (as one did, under
    load, on a connection attempt already finished) would block its loop for good, and
    the test then fails on the join instead of hanging."""
    outcomes: list[object] = []

    async def main() -> None:
        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(slam, "127.0.0.1", 0)
        pool = Pool("127.0.0.1", server.sockets[0].getsockname()[1], size=2, depth=1)
        try:
            outcomes.extend(
                await asyncio.gather(
                    *(pool.request(enforce_request(n), within=5) for n in range(50)),
                    return_exceptions=True,
                )
            )
        finally:
            pool.close()
            server.close()

    worker = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the pool never gave its event loop back"
    assert len(outcomes) == 50 and all(isinstance(o, Dropped) for o in outcomes)
