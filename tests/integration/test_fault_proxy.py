"""The fault proxy itself, in front of the real Redis: it passes, cuts, delays and
blackholes as tests rely on it to."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import REDIS_URL
from tests.faults import FaultProxy

TIMEOUT = 0.5


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(urlsplit(REDIS_URL).port or 6379) as running:
        yield running


def client(proxy: FaultProxy) -> redis.Redis:
    return redis.Redis(
        port=proxy.port,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


def test_passes_then_cuts_existing_and_new_connections_then_restores(proxy: FaultProxy) -> None:
    before = client(proxy)
    assert before.ping()
    proxy.cut()
    with pytest.raises(redis.ConnectionError):
        before.ping()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    proxy.restore()
    assert client(proxy).ping()
    assert proxy.connections == 2


def test_delays_each_way(proxy: FaultProxy) -> None:
    store = client(proxy)
    store.ping()
    proxy.delay(0.15)
    started = time.monotonic()
    assert store.ping()
    assert 0.3 <= time.monotonic() - started < TIMEOUT


def test_blackhole_takes_connections_and_never_answers_until_restored(
    proxy: FaultProxy,
) -> None:
    held = client(proxy)
    held.ping()
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        held.ping()
    assert time.monotonic() - started >= TIMEOUT * 0.9
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            raw.recv(16)
    proxy.restore()
    assert client(proxy).ping()
