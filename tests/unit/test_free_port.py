"""Ports picked for servers about to listen: never one handed out just before, nor a
proxy's own target, whatever the kernel hands back."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from services.common import broker


def kernel_gives(monkeypatch: pytest.MonkeyPatch, ports: list[int]) -> None:
    """``bind(("127.0.0.1", 0))`` in ``free_port`` gets these ports, in turn."""
    given = iter(ports)

    class Socket(socket.socket):
        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", next(given))

    monkeypatch.setattr(broker, "socket", SimpleNamespace(socket=Socket))


def test_a_port_just_handed_out_is_not_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two app processes' ports picked in a row, neither bound yet: the kernel may give
    the same free port twice."""
    kernel_gives(monkeypatch, [45151, 45151, 45252])
    assert [broker.free_port(), broker.free_port()] == [45151, 45252]


def test_a_proxy_never_gets_the_port_it_forwards_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's broker port, picked and not yet bound, came back to its fault proxy once:
    the proxy forwarded to itself until the run ran out of file descriptors."""
    kernel_gives(monkeypatch, [46161, 46262])
    assert broker.free_port(avoid=(46161,)) == 46262
