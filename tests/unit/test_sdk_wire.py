"""The SDK's cheap per-request pieces say the same as the slow ones they replaced: event
ids never repeat (not even in a forked worker), timestamps are RFC 3339 UTC, batch
bodies are the events' JSON (gzipped), the buffer numbers what it held without storing
the numbers, relayed headers are ASGI-encoded once."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tally_sdk import Tally, TallyMiddleware
from tally_sdk.buffer import Event, EventBuffer
from tally_sdk.decision import Decision
from tally_sdk.emitter import CHUNK, batch_json, gzipped
from tally_sdk.errors import BufferFull
from tally_sdk.events import new_id, now, timestamp
from tally_sdk.keys import Keys, api_key
from tally_sdk.middleware import header
from tally_sdk.routes import MAX_ENDPOINT, dimension


def test_ids_do_not_repeat_within_a_process() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(0 < len(i) <= 256 for i in ids)  # what ingest accepts


def test_a_forked_process_draws_its_own_ids() -> None:
    """A pre-forking server (gunicorn --preload) must not send the parent's ids again:
    Tally would drop the child's events as duplicates."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the next few ids it makes
        os.write(write, " ".join(new_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [new_id() for _ in range(3)]
    assert len(child) == 3
    assert {i[:24] for i in child}.isdisjoint({i[:24] for i in parent})


def test_now_is_rfc3339_utc_and_current() -> None:
    stamps = [now() for _ in range(1000)]
    for stamp in (stamps[0], stamps[-1], timestamp()):
        parsed = datetime.fromisoformat(stamp)
        assert stamp.endswith("+00:00") and len(stamp) == len("2026-12-02T06:28:05.123456+00:00")
        assert abs(parsed - datetime.now(UTC)) < timedelta(seconds=1)
    assert stamps == sorted(stamps)  # the same clock as datetime.now, never behind itself


@pytest.mark.parametrize("nanos", [0, 1_000, 5_000_000, 123_456_789, 999_999_999])
def test_now_writes_every_microsecond_as_datetime_does(
    nanos: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    second = 1_796_428_800  # 2026-12-05T00:00:00Z
    monkeypatch.setattr(time, "time_ns", lambda: second * 10**9 + nanos)  # events.now reads it
    moment = datetime.fromtimestamp(second, UTC) + timedelta(microseconds=nanos // 1000)
    assert now() == moment.isoformat(timespec="microseconds")


def test_a_given_time_keeps_its_own_offset() -> None:
    moment = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
    assert timestamp(moment) == "2026-12-02T08:00:00+00:00"


async def test_a_batch_body_is_the_events_json_gzipped() -> None:
    events = [{"id": str(n), "data": {"endpoint": "/ü", "status": 200}} for n in range(450)]
    body = await batch_json(events)
    assert json.loads(body) == events  # across chunks
    assert json.loads(gzip.decompress(gzipped(body))) == events
    assert json.loads(await batch_json(events[:1])) == events[:1]
    assert json.loads(await batch_json([])) == []


async def test_a_batch_is_encoded_with_the_event_loop_free_between_chunks() -> None:
    """Requests are served between chunks: a batch never holds the loop for longer than
    one chunk's encoding."""
    steps = 0

    async def count_steps() -> None:
        nonlocal steps
        while True:
            steps += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_steps())
    await asyncio.sleep(0)
    before = steps
    await batch_json([{"id": str(n)} for n in range(5 * CHUNK)])
    counter.cancel()
    assert steps - before >= 4  # a step of the loop between each two of the 5 chunks


def test_the_buffer_numbers_what_it_held_and_keeps_the_oldest_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = itertools.count(1.0)
    monkeypatch.setattr("tally_sdk.buffer.monotonic", lambda: next(ticks))
    dropped: list[Event] = []
    buffer = EventBuffer(3, "drop_oldest", dropped.append)
    assert (buffer.head, buffer.next_seq) == (0, 0)
    assert [buffer.put({"id": str(n)}) for n in range(3)] == [1, 2, 3]
    assert buffer.oldest_at == 1.0  # taken when the first came, not for each
    assert buffer.put({"id": "3"}) == 3 and dropped == [{"id": "0"}]
    assert (buffer.head, buffer.next_seq) == (1, 4)
    assert buffer.take(2) == [{"id": "1"}, {"id": "2"}] and buffer.head == 3
    assert buffer.oldest_at == 2.0  # the rest wait from the take, not with the batch taken
    assert buffer.take(5) == [{"id": "3"}] and buffer.oldest_at == 2.0
    buffer.put({"id": "4"})
    buffer.put({"id": "5"})
    assert buffer.oldest_at == 3.0 and (buffer.head, buffer.next_seq) == (4, 6)
    full = EventBuffer(1, "raise", dropped.append)
    full.put({"id": "a"})
    with pytest.raises(BufferFull):
        full.put({"id": "b"})
    assert full.next_seq == 1 and len(full) == 1


async def test_what_orjson_refuses_still_encodes() -> None:
    events = [{"id": "a", "data": {"value": 2**70}}]  # beyond orjson's 64-bit integers
    assert json.loads(await batch_json(events)) == events


def test_an_allowed_answer_relays_its_ratelimit_headers_but_retry_after() -> None:
    headers = {"RateLimit": '"d";r=9;t=60', "RateLimit-Policy": '"d";q=10;w=60', "Retry-After": "5"}
    decision = Decision(allowed=True, status=200, headers=headers)
    assert decision.added_headers == (
        (b"ratelimit", b'"d";r=9;t=60'),
        (b"ratelimit-policy", b'"d";q=10;w=60'),
    )


def test_the_legacy_x_ratelimit_headers_are_relayed_when_tally_sends_them() -> None:
    sent = {
        "content-type": "application/json",
        "ratelimit": '"d";r=9;t=60',
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "9",
        "x-ratelimit-reset": "1796212800",
    }
    decision = Decision.from_answer(200, sent, {"allowed": True})
    assert dict(decision.added_headers) == {
        b"ratelimit": b'"d";r=9;t=60',
        b"x-ratelimit-limit": b"10",
        b"x-ratelimit-remaining": b"9",
        b"x-ratelimit-reset": b"1796212800",
    }


def scope_with(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "path": "/", "headers": list(headers)}


def test_the_key_comes_from_a_bearer_token_else_x_api_key() -> None:
    bearer, x_key = (b"authorization", b"Bearer  k1 "), (b"x-api-key", b" k2 ")
    assert api_key(scope_with(x_key, bearer)) == "k1"
    assert api_key(scope_with((b"authorization", b"Basic abc"), x_key)) == "k2"
    assert api_key(scope_with((b"authorization", b"Bearer "), x_key)) == "k2"
    assert api_key(scope_with(x_key, (b"x-api-key", b"other"))) == "k2"  # the first one
    assert api_key(scope_with((b"x-api-key", b"  "))) is None
    assert api_key(scope_with((b"x-api-key", b""))) is None
    assert api_key(scope_with()) is None


def test_the_key_is_found_in_headers_of_any_shape_asgi_allows() -> None:
    """Pairs as lists, an iterable that is not a sequence, names and values as
    bytearray: the first of each header still wins."""
    pairs = [[b"x-api-key", b"k1"], [b"x-api-key", b"k2"]]
    assert api_key({"headers": pairs}) == "k1"
    assert api_key({"headers": (pair for pair in pairs)}) == "k1"
    arrays = [(bytearray(b"authorization"), bytearray(b"Bearer k3")), (b"x-api-key", b"k4")]
    assert api_key({"headers": arrays}) == "k3"
    assert api_key({"headers": None}) is None and api_key({}) is None
    names_as_text = iter([("x-api-key", "k5")])  # not ASGI: ignored, not an error
    assert api_key({"headers": names_as_text}) is None


_NAMES = st.sampled_from(
    [b"authorization", b"x-api-key", b"host", bytearray(b"x-api-key"), "x-api-key"]
)
_VALUES = st.one_of(
    st.sampled_from([b"Bearer k1", b"bearer  k2 ", b"Basic k3", b"Bearer ", b" k4 ", b""]),
    st.binary(max_size=12),
    st.builds(bytearray, st.sampled_from([b"Bearer k5", b"k6"])),
    st.sampled_from([memoryview(b"Bearer k1"), memoryview(b"k6")]),  # hash as bytes do
    st.text(max_size=4),
)


@given(st.lists(st.lists(st.tuples(_NAMES, _VALUES), max_size=4), max_size=6))
def test_remembered_keys_are_the_keys_parsed_afresh(
    requests: list[list[tuple[object, object]]],
) -> None:
    """``Keys`` answers any headers as ``api_key`` does, request after request, from
    memory or not (a memory of three pairs, so that forgetting is exercised too)."""
    keys = Keys(max_remembered=3)
    for headers in requests * 2:
        assert keys.read({"headers": list(headers)}) == api_key({"headers": headers})


def test_a_memoryview_value_means_what_its_bytes_mean() -> None:
    """Not ASGI, but bytes-like: it hashes equal to its bytes, so it would find their
    remembered key; parsed afresh it must give the same."""
    keys = Keys()
    writable = memoryview(bytearray(b"Bearer k1"))  # cannot be hashed: ValueError
    for value in (b"Bearer k1", memoryview(b"Bearer k1"), writable):
        assert keys.read(scope_with((b"authorization", value))) == "k1"  # type: ignore[arg-type]
        assert api_key(scope_with((b"authorization", value))) == "k1"  # type: ignore[arg-type]


def test_an_apps_endpoint_names_are_cleaned_and_text() -> None:
    """What an app's own ``endpoint`` returns is cleaned as Tally takes it; a name that
    is not text is the raw path's (not ``"None"``, one lease for every request)."""

    async def app(scope: object, receive: object, send: object) -> None: ...

    def named(endpoint: Any) -> str:
        middleware = TallyMiddleware(
            app, tally=Tally("http://tally.invalid", "t"), endpoint=endpoint
        )
        return middleware._name({"type": "http", "path": "/v1/a\x00b", "headers": []})

    assert named(lambda scope: scope["path"] + "\udc80") == "/v1/ab"
    assert named(lambda scope: None) == "/v1/ab"
    assert named(lambda scope: b"/x") == "/v1/ab"


def test_long_header_values_are_not_remembered() -> None:
    """A caller's megabyte header must not stay in the app's memory; short ones do."""
    keys = Keys()
    huge = {"headers": [(b"x-api-key", b"k" * 1_000_000)]}
    assert keys.read(huge) == "k" * 1_000_000
    assert keys._known == {}
    assert keys.read(scope_with((b"x-api-key", b"k1"))) == "k1"
    assert keys._known == {(None, b"k1"): "k1"}


def test_a_header_value_that_is_not_bytes_is_ignored_not_an_error() -> None:
    """ASGI sends values as bytes; a scope built by hand with a ``str`` value finds no
    key there (the other header still counts) rather than failing the request."""
    assert api_key(scope_with((b"authorization", "Bearer k1"), (b"x-api-key", b"k2"))) == "k2"  # type: ignore[arg-type]
    assert api_key(scope_with((b"x-api-key", "k3"))) is None  # type: ignore[arg-type]
    assert api_key(scope_with((b"x-api-key", 5))) is None  # type: ignore[arg-type]
    user = header("x-user-id")
    assert user(scope_with((b"x-user-id", "u1"))) is None  # type: ignore[arg-type]
    assert user(scope_with((b"x-user-id", b" u2 "))) == "u2"
    assert user(scope_with((b"x-user-id", b"  "))) is None
    assert user(scope_with((b"x-user-id", b""))) is None


def test_excluded_paths_and_everything_below_them_pass_untouched() -> None:
    async def app(scope: object, receive: object, send: object) -> None: ...

    middleware = TallyMiddleware(app, tally=Tally("http://tally.invalid", "t"), exclude=["/docs/"])
    assert middleware._excluded("/docs") and middleware._excluded("/docs/a")
    assert not middleware._excluded("/docsx") and not middleware._excluded("/v1/docs")


def test_a_dimension_is_cut_and_cleaned_as_tally_takes_it() -> None:
    assert dimension("a\x00b\x85c\ud800d\udfffe") == "abcde"
    assert dimension("/v1/ünïcode") == "/v1/ünïcode"
    assert dimension("x" * 300) == "x" * MAX_ENDPOINT
