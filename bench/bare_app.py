"""The baselines for the enforcement benchmark: ``/v1/enforce`` deciding nothing.

Each validates the same request body and answers a decision-shaped JSON with the same
headers, but decides nothing, served as Tally is (``server_config``, uvloop, a frozen
heap).  Two ways, as two processes:

- ``--kind fastapi``: a FastAPI endpoint, through FastAPI's application (routing,
  dependency solving, its middleware);
- ``--kind hot-path``: a plain Starlette route answered ahead of the FastAPI application
  by ``services.common.hot_paths.HotPaths``, exactly as Tally serves ``/v1/enforce``.

The difference between the hot-path baseline and ``/v1/enforce`` is the price of
authentication, the Redis round trips and the decision itself; between the FastAPI
baseline and ``/v1/enforce``, that price less what the hot path saves.

    python -m bench.bare_app --port 8100 --kind hot-path
"""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from services.api.enforcement.enforcer import EnforceRequest
from services.common.hot_paths import HotPaths
from services.common.problems import invalid_request
from services.common.settings import Settings
from services.runtime import freeze_heap, run, server_config

ANSWER = orjson.dumps({"allowed": True, "remaining": 1, "reset": 1, "limits": []})
HEADERS = {"RateLimit-Policy": '"bare";q=1;w=1', "RateLimit": '"bare";r=1;t=1'}
KINDS = ("fastapi", "hot-path")


def _fastapi() -> FastAPI:
    bare = FastAPI()

    @bare.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return bare


def fastapi_app() -> FastAPI:
    """``/v1/enforce`` as a FastAPI endpoint."""
    bare = _fastapi()

    @bare.post("/v1/enforce")
    async def enforce(body: EnforceRequest) -> Response:
        return Response(ANSWER, media_type="application/json", headers=HEADERS)

    return bare


def hot_path_app() -> ASGIApp:
    """``/v1/enforce`` as a hot path, ahead of a FastAPI application (as in
    ``services.runtime.http_app`` and ``services.api.enforcement.routes``)."""

    async def enforce(request: Request) -> Response:
        try:
            EnforceRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise invalid_request(exc.errors(), "body") from None
        return Response(ANSWER, media_type="application/json", headers=HEADERS)

    fast = [Route("/v1/enforce", enforce, methods=["POST"])]
    bare = _fastapi()
    bare.router.routes[:0] = fast
    return HotPaths(bare, fast)


def app(kind: str = "fastapi") -> ASGIApp:
    return hot_path_app() if kind == "hot-path" else fastapi_app()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=KINDS, default="fastapi")
    args = parser.parse_args()
    settings = Settings(port=args.port, log_level="WARNING")
    freeze_heap()  # as Tally's processes do
    run(uvicorn.Server(server_config(app(args.kind), settings)).serve())


if __name__ == "__main__":
    main()
