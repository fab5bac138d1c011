"""The lease script's Python side: taking, renewing and returning a lease in one call.

``lease.lua`` decides and grants atomically, with the same checks and algorithms as an
enforcement decision (``admission.lua``), so a lease never admits what ``/v1/enforce``
would refuse.  This module only prepares the call and reads the answer.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import orjson

from schemas import redis_keys
from schemas.events import VALUE_SCALE, from_micros
from services.api.enforcement.limiter import (
    LEASE_SCRIPT,
    LEASE_SHA,
    Outcome,
    decision_keys,
    parse_body,
    run,
)
from services.api.enforcement.pipelined import Arg, Pipelined
from services.common.zone_book import ZoneOf, in_utc


class LeaseMode(StrEnum):
    TAKE = "take"  # a new lease
    RENEW = "renew"  # give back the term's unspent units, then take again under the same id
    RETURN = "return"  # give back the term's unspent units; the lease ends


def new_lease_id() -> str:
    """96 random bits: ``ls_`` and 16 URL-safe characters (``LEASE_ID_PATTERN``)."""
    return "ls_" + secrets.token_urlsafe(12)


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    lease: str
    mode: LeaseMode
    meter: str = ""  # '' when returning: the lease's own
    want: int = 0  # calls
    spent: int = 0  # calls spent of the current term (renew, return)
    endpoint: str = ""
    key_id: str = ""  # '' when a service token acts for the customer
    scope: str = "enforce"
    term: int = 0  # the term this request starts (1: a take) or returns; 0: not numbered


@dataclass(slots=True)
class Grant:
    """What the script answered: the decision, and for a lease what it holds now."""

    outcome: Outcome
    meter: str = ""
    granted: int = 0  # calls (and quota units) granted for this term
    tokens: int = 0  # tokens taken from each rate limit that applies
    expires_ms: int = 0  # the term's end, Redis clock
    expires_in_ms: int = 0  # how long the term has left (less than its ttl on a resend)
    freed: Decimal = Decimal(0)  # units of the previous term given back
    held: Decimal = Decimal(0)  # after a return: spent units still awaiting their events


class Leaser:
    def __init__(
        self,
        connection: Pipelined,
        ttl_ms: int,
        settle_ms: int,
        share: int,
        past_due_grace_ms: int | None = None,
        zone_of: ZoneOf = in_utc,
    ) -> None:
        """``ttl_ms``: a term's length; ``settle_ms``: how long spent units stay held
        waiting for their events; ``share``: a lease takes at most 1/share of the room
        the tightest limit has left; ``zone_of``: each customer's billing zone."""
        self._zone_of = zone_of
        self._connection = connection
        self._ttl, self._settle, self._share = ttl_ms, settle_ms, share
        self._grace: Arg = "" if past_due_grace_ms is None else past_due_grace_ms

    @property
    def ttl_ms(self) -> int:
        return self._ttl

    async def ask(
        self, customer: str, ask: LeaseAsk, now: datetime, clock_us: int | None = None
    ) -> Grant:
        """``now`` picks the quota period; ``clock_us`` overrides Redis's clock (tests)."""
        tz = self._zone_of(customer)
        answer = redis_keys.lease_answer(customer, ask.lease)
        keys, (start_ms, end_ms) = decision_keys(customer, ask.meter or "-", now, answer, tz)
        args: list[Arg] = [
            ask.key_id,
            ask.scope,
            "" if clock_us is None else clock_us,
            ask.endpoint,
            ask.want,
            ask.mode.value,
            ask.lease,
            ask.spent * VALUE_SCALE,
            ask.meter,
            start_ms,
            end_ms,
            self._ttl,
            self._settle,
            self._share,
            self._grace,
            ask.term or "",
        ]
        raw = await run(self._connection, LEASE_SCRIPT, LEASE_SHA, keys, args)
        return _grant(orjson.loads(raw), ask.meter)


def _grant(body: dict[str, Any], meter: str) -> Grant:
    return Grant(
        outcome=parse_body(body),
        meter=body.get("m") or meter,
        granted=body.get("n") or 0,
        tokens=body.get("t") or 0,
        expires_ms=body.get("e") or 0,
        expires_in_ms=body.get("i") or 0,
        freed=from_micros(int(body.get("f") or 0)),
        held=from_micros(int(body.get("h") or 0)),
    )
