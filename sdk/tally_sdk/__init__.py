"""Tally's Python SDK: emit usage events, and enforce limits before serving a request.

async with Tally("http://127.0.0.1:8000", token, source="my-api") as tally:
    tally.emit("api_call", "cus_123", endpoint="/v1/search")
    decision = await tally.check(customer="cus_123", endpoint="/v1/search")
"""

from tally_sdk.backoff import Backoff
from tally_sdk.client import Tally
from tally_sdk.decider import Ask, Decider, RemoteDecider
from tally_sdk.decision import Decision
from tally_sdk.errors import (
    AuthenticationError,
    BufferFull,
    ClientClosed,
    InvalidRequest,
    ServerError,
    TallyError,
    Unavailable,
)
from tally_sdk.leases import LeaseDecider
from tally_sdk.middleware import TallyMiddleware
from tally_sdk.reports import EmitStats, Outcome, Undelivered
from tally_sdk.routes import RouteTemplates, raw_path

__version__ = "0.1.0"
__all__ = [
    "Ask",
    "AuthenticationError",
    "Backoff",
    "BufferFull",
    "ClientClosed",
    "Decider",
    "Decision",
    "EmitStats",
    "InvalidRequest",
    "LeaseDecider",
    "Outcome",
    "RemoteDecider",
    "RouteTemplates",
    "ServerError",
    "Tally",
    "TallyError",
    "TallyMiddleware",
    "Unavailable",
    "Undelivered",
    "raw_path",
]
