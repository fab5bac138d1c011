"""The baseline for the enforcement benchmark: a bare FastAPI endpoint, served as Tally is.

It validates the same request body and answers a decision-shaped JSON with the same
headers, but decides nothing: the difference between it and ``/v1/enforce`` is the
price of authentication, the Redis round trips and the decision itself.

    python -m bench.bare_app --port 8100
"""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

from services.api.enforcement.enforcer import EnforceRequest
from services.common.settings import Settings
from services.runtime import freeze_heap, run, server_config

ANSWER = orjson.dumps({"allowed": True, "remaining": 1, "reset": 1, "limits": []})
HEADERS = {"RateLimit-Policy": '"bare";q=1;w=1', "RateLimit": '"bare";r=1;t=1'}


def app() -> FastAPI:
    bare = FastAPI()

    @bare.post("/v1/enforce")
    async def enforce(body: EnforceRequest) -> Response:
        return Response(ANSWER, media_type="application/json", headers=HEADERS)

    @bare.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return bare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    settings = Settings(port=port, log_level="WARNING")
    freeze_heap()  # as Tally's processes do
    run(uvicorn.Server(server_config(app(), settings)).serve())


if __name__ == "__main__":
    main()
