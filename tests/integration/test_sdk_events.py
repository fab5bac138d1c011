"""The middleware's usage events: batched by size and time, gzipped, flushed when the
app shuts down, within the buffer's bound when Tally does not take them.  Against the
scripted stand-in Tally of ``tests.sdk_fake`` (real sockets), which shows what went
over the wire; delivery to the real ingest is in ``tests/e2e/test_sdk_emit.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from tally_sdk import Tally, TallyMiddleware
from tally_sdk.asgi import Receive, Scope, Send
from tally_sdk.reports import Undelivered

from tests.sdk_fake import Answer, Seen, allow_all, fake_tally, reply

Message = dict[str, Any]


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the middleware: lifespan support and one plain answer."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


async def serve_requests(app: Any, count: int) -> list[int]:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        answers = await asyncio.gather(
            *(client.get(f"/r/{n}", headers={"X-API-Key": "k"}) for n in range(count))
        )
    return [a.status_code for a in answers]


async def shut_down(app: Any) -> list[str]:
    """Run the app's lifespan from startup to the end of shutdown, as a server does;
    the messages the app sent back."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[str] = []
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        inbox.put_nowait({"type": kind})

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
    return sent


async def events_unavailable(seen: Seen) -> Answer | None:
    """Ingest answering 503 for a while (Retry-After 30 s); decisions allowed."""
    if seen.path == "/v1/events":
        return reply(503, {"detail": "down"}, {"Retry-After": "30"})
    return await allow_all(seen)


def events(fake_seen: list[Seen]) -> list[list[dict[str, Any]]]:
    return [s.json() for s in fake_seen if s.path == "/v1/events"]


async def test_events_leave_in_gzipped_batches_bounded_by_size() -> None:
    async with fake_tally() as fake:
        tally = Tally(fake.url, "svc", source="app", max_batch=10, max_delay=60)
        app = TallyMiddleware(hello, tally=tally)
        assert await serve_requests(app, 25) == [200] * 25
        await asyncio.sleep(0.2)  # two full batches go at once; five wait for max_delay
        early = events(fake.seen)
        assert await shut_down(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        batches = events(fake.seen)
        await tally.aclose()
    assert [len(b) for b in early] == [10, 10]
    assert [len(b) for b in batches] == [10, 10, 5]  # the rest, flushed on shutdown
    posts = [s for s in fake.seen if s.path == "/v1/events"]
    assert all(s.headers["content-encoding"] == "gzip" for s in posts)
    sent = [e for b in batches for e in b]
    assert sorted(e["data"]["endpoint"] for e in sent) == sorted(f"/r/{n}" for n in range(25))
    assert len({e["id"] for e in sent}) == 25 and {e["subject"] for e in sent} == {"cus_1"}


async def test_a_partial_batch_leaves_after_max_delay() -> None:
    async with (
        fake_tally() as fake,
        Tally(fake.url, "svc", max_batch=500, max_delay=0.05) as tally,
    ):
        await serve_requests(TallyMiddleware(hello, tally=tally), 3)
        await asyncio.sleep(0.5)
        assert [len(b) for b in events(fake.seen)] == [3]


async def test_compression_can_be_turned_off() -> None:
    async with fake_tally() as fake, Tally(fake.url, "svc", compress=False) as tally:
        await serve_requests(TallyMiddleware(hello, tally=tally), 2)
    posts = [s for s in fake.seen if s.path == "/v1/events"]
    assert posts and all("content-encoding" not in s.headers for s in posts)
    assert sum(len(s.json()) for s in posts) == 2


async def test_while_ingest_refuses_the_buffer_stays_bounded_and_requests_are_served() -> None:
    reports: list[Undelivered] = []
    async with fake_tally(events_unavailable) as fake:
        tally = Tally(
            fake.url,
            "svc",
            max_buffer=20,
            max_batch=5,
            max_delay=0.01,
            close_timeout=0.2,
            on_undelivered=reports.append,
        )
        app = TallyMiddleware(hello, tally=tally)
        assert await serve_requests(app, 60) == [200] * 60  # unmetered past the bound
        await asyncio.sleep(0.1)
        stats = tally.stats
        await tally.aclose()
    # 5 in flight (retried after Retry-After) + 20 buffered, the rest refused by the
    # buffer (raise: logged, not metered); aclose reports what was left as abandoned.
    assert stats.emitted == 25
    assert tally.stats.abandoned == 25 and tally.stats.pending == 0
    assert len(events(fake.seen)) == 1
    # each reported as the whole event, the ones in flight exactly as they were sent
    assert [r.event for r in reports[:5]] == events(fake.seen)[0]
    assert all(r.event["type"] == "api_call" and r.event["time"] for r in reports)
    assert len({r.event["id"] for r in reports}) == 25


async def test_a_flush_waiting_elsewhere_ends_when_aclose_gives_the_events_up() -> None:
    """Ingest away: ``aclose`` reports what is left as abandoned after its grace; a
    ``flush`` another task was waiting on then has nothing pending, and returns."""

    async with fake_tally(events_unavailable) as fake:
        tally = Tally(fake.url, "svc", max_delay=0.01, close_timeout=0.2)
        await serve_requests(TallyMiddleware(hello, tally=tally), 3)
        flushing = asyncio.create_task(tally.flush())
        await asyncio.sleep(0.05)
        await tally.aclose()
        done, _ = await asyncio.wait({flushing}, timeout=2)
    assert done == {flushing} and flushing.exception() is None
    assert tally.stats.abandoned == 3 and tally.stats.pending == 0
