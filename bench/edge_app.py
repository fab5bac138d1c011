"""The API the edge benchmark serves, three ways: plain, behind slowapi, behind Tally.

One small FastAPI endpoint (``POST /v1/geocode``: read a JSON body, answer a small JSON),
served by uvicorn the same way each time (uvloop, httptools, no access log), so the
difference between the kinds is the limiter alone:

- ``plain``: nothing in front;
- ``slowapi``: slowapi's ``SlowAPIMiddleware`` with a generous per-key limit kept in
  Redis (``--redis-url``), the common way to rate-limit a FastAPI app;
- ``tally``: ``TallyMiddleware`` (calls admitted from leases held in the app, events
  batched to ``/v1/events``), against the Tally at ``--tally-url``;
- ``tally_remote``: the same, every request decided by Tally (``RemoteDecider``, one
  pipelined ``/v1/enforce`` round trip per request), the middleware's earlier default.

    python -m bench.edge_app --kind tally --port 8200 --tally-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIMiddleware
from starlette.types import ASGIApp
from tally_sdk import RemoteDecider, Tally, TallyMiddleware

from bench.in_app import Timed
from services.runtime import freeze_heap

KINDS = ("plain", "slowapi", "tally", "tally_remote")
TOKEN = "bench-token"


class Query(BaseModel):
    q: str


def api() -> FastAPI:
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/geocode")
    async def geocode(query: Query) -> dict[str, object]:
        return {"query": query.q, "lat": 52.52, "lon": 13.405}

    return app


def caller_key(request: Request) -> str:
    return request.headers.get("x-api-key", "anonymous")


def with_slowapi(redis_url: str) -> ASGIApp:
    app = api()
    app.state.limiter = Limiter(
        key_func=caller_key, storage_uri=redis_url, default_limits=["100000/second"]
    )
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIMiddleware)
    return app


def with_tally(tally_url: str, token: str, remote: bool) -> ASGIApp:
    tally = Tally(tally_url, token, source="bench-edge")
    decider = RemoteDecider(tally) if remote else None
    return TallyMiddleware(api(), tally=tally, exclude=("/readyz",), decider=decider)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--tally-url", default="")
    parser.add_argument("--token", default=TOKEN, help="Tally's service token")
    args = parser.parse_args()
    app: ASGIApp = api()
    if args.kind == "slowapi":
        app = with_slowapi(args.redis_url)
    elif args.kind.startswith("tally"):
        app = with_tally(args.tally_url, args.token, remote=args.kind == "tally_remote")
    config = uvicorn.Config(
        Timed(app),  # every kind alike: a clock read and an append per request
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",  # TallyMiddleware flushes its events on shutdown
        access_log=False,
        log_level="warning",
    )
    freeze_heap()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
