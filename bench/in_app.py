"""Each request's time inside the app, for telling the middleware's latency from the machine's.

``bench.edge`` times requests at the load generator: that latency holds the app's own
time and everything around it — the generator's and the app's waits for a core, which
on a shared machine grow with whatever else runs (``tally up`` counting the events the
middleware sends is some of it).  ``Timed`` wraps the whole app, middleware included,
and records how long each request took from the moment the app was handed it until it
sent the last byte of its answer: what the middleware adds inside the process, and
nothing of the load generator.  A request that waited in the socket while the event
loop was busy with another is not charged for that wait here (it is at the generator):
the two figures side by side bound the middleware's share.

``GET /_timings`` answers the durations recorded since the last call, in seconds, as a
JSON array, and forgets them; it is not timed and never reaches the app.
"""

from __future__ import annotations

import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PATH = "/_timings"


class Timed:
    """An ASGI app: ``app``, with each HTTP request's time inside it recorded."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.durations: list[float] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == PATH:
            await self._answer(send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.durations.append(time.perf_counter() - started)

        await self.app(scope, receive, timed)

    async def _answer(self, send: Send) -> None:
        body, self.durations = orjson.dumps(self.durations), []
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
