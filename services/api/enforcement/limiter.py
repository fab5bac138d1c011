"""The enforcement script's Python side: compiling a plan's limits, asking, reading the answer.

All the deciding happens in ``enforce.lua``, inside Redis, in one call per decision:
that is what makes it race-free (500 concurrent callers see one sequence of
admissions) and fast (one round trip).  This module only prepares the call.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from redis.exceptions import ResponseError

from schemas import account_state, lua, redis_keys
from schemas.account_state import epoch_ms
from schemas.events import from_micros, to_micros
from schemas.windows import Window
from schemas.zones import QuotaMonth, quota_month
from services.api.enforcement.pipelined import Arg, Pipelined
from services.common.redis import pack
from services.common.zone_book import ZoneOf, in_utc

_FIELDS = ", ".join(f"'{f}'" for f in account_state.FIELDS)
ADMISSION = redis_keys.RELEASE_LUA + lua.source("admission")
"""What ``enforce.lua`` and ``lease.lua`` share (checks, algorithms), prepended to each."""
SCRIPT = ADMISSION + lua.source("enforce", ACCOUNT_FIELDS=_FIELDS)
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
LEASE_SCRIPT = ADMISSION + lua.source("lease", ACCOUNT_FIELDS=_FIELDS)
LEASE_SHA = hashlib.sha1(LEASE_SCRIPT.encode()).hexdigest()


class Mode(StrEnum):
    CHECK = "check"  # consume rate limits; compare the quota with usage so far
    RESERVE = "reserve"  # also hold the quantity against the quota until its event lands
    PEEK = "peek"  # decide, record nothing


class Code(StrEnum):
    OK = "ok"
    REFUSED = "refused"
    NO_ACCOUNT = "no_account"
    KEY_UNKNOWN = "key_unknown"
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    KEY_SCOPE = "key_scope"
    INACTIVE = "inactive"
    TRIAL_EXPIRED = "trial_expired"
    PAST_DUE = "past_due"  # unpaid beyond the grace period
    RESERVATION_CONFLICT = "reservation_conflict"
    LEASE_UNKNOWN = "lease_unknown"  # no such lease (for this customer), or settled
    LEASE_METER = "lease_meter"  # a renewal naming another meter than the lease's
    LEASE_TAKEN = "lease_taken"  # a take naming the id of a lease that exists
    LEASE_STALE = "lease_stale"  # a numbered request for another term than the next
    LEASE_REUSED = "lease_reused"  # a term number answered already, for another request
    LEASE_OVERSPENT = "lease_overspent"  # spent more than the term granted
    RETURNED = "returned"  # a lease given back
    END_USER_REQUIRED = "end_user_required"  # a limit per end user, and none named
    PER_REQUEST = "per_request"  # a lease declined: a limit per end user decides each call


@dataclass(slots=True)
class Limit:
    """One policy's view of a decision; times in milliseconds, amounts in units.
    (Not frozen: a frozen dataclass costs a microsecond per field to build, and two
    are built per decision.)"""

    policy: str
    kind: str  # rate | quota
    limit: Decimal
    remaining: Decimal
    reset_ms: int
    retry_ms: int
    window_ms: int
    algorithm: str | None = None
    hard: bool | None = None

    @property
    def reset(self) -> int:
        return _seconds(self.reset_ms)

    @property
    def window(self) -> int:
        return _seconds(self.window_ms)

    @property
    def retry_after(self) -> int:
        return max(1, _seconds(self.retry_ms))


@dataclass(slots=True)
class Outcome:
    code: Code
    plan: str = ""
    status: str = ""
    upgrade: str | None = None
    limits: tuple[Limit, ...] = ()
    violated: Limit | None = None
    reserved: bool = False
    grace_ended_ms: int = 0  # for PAST_DUE
    legacy_headers: bool = False  # the plan asks for X-RateLimit-* too
    policy: str = ""  # END_USER_REQUIRED, PER_REQUEST: the rate limit scoped per end user

    @property
    def allowed(self) -> bool:
        return self.code is Code.OK


@dataclass(frozen=True, slots=True)
class Ask:
    """What one decision is about."""

    meter: str
    quantity: Decimal = Decimal(1)
    endpoint: str = ""
    mode: Mode = Mode.CHECK
    digest: bytes = b""  # the settling event's (source, id) digest, for reservations
    key_id: str = ""  # '' when a service token acts for the customer
    scope: str = "enforce"
    end_user: str = ""  # who the customer's call is for (limits scoped per end user)


def _seconds(ms: int) -> int:
    return -(-ms // 1000)


class Limiter:
    def __init__(
        self,
        connection: Pipelined,
        reservation_ttl_ms: int,
        past_due_grace_ms: int | None = None,
        zone_of: ZoneOf = in_utc,
    ) -> None:
        """``past_due_grace_ms``: how long a past_due account is still admitted (None:
        for ever); ``zone_of``: each customer's billing zone, where its quotas' months
        start."""
        self._zone_of = zone_of
        self._connection = connection
        self._ttl = reservation_ttl_ms
        self._grace: Arg = "" if past_due_grace_ms is None else past_due_grace_ms

    @property
    def zone_of(self) -> ZoneOf:
        return self._zone_of

    async def _script(self, keys: list[str], args: list[Arg]) -> Any:
        return await run(self._connection, SCRIPT, SHA, keys, args)

    async def decide(
        self, customer: str, ask: Ask, now: datetime, clock_us: int | None = None
    ) -> Outcome:
        """``now`` picks the quota period; ``clock_us`` overrides Redis's clock (tests)."""
        tz = self._zone_of(customer)
        end_user = redis_keys.end_user_rate_states(customer, ask.end_user)
        keys, (start_ms, end_ms) = decision_keys(customer, ask.meter, now, end_user, tz)
        args: list[Arg] = [
            ask.key_id,
            ask.scope,
            "" if clock_us is None else clock_us,
            ask.endpoint,
            to_micros(ask.quantity),
            ask.mode.value,
            ask.digest,
            self._ttl,
            ask.meter,
            start_ms,
            end_ms,
            "",
            self._grace,
            ask.end_user,
        ]
        return parse(await self._script(keys, args))

    async def limit_address(
        self,
        address: str,
        policies: str,
        mode: Mode,
        clock_us: int | None = None,
        endpoint: str = "",
    ) -> Outcome:
        """Limits on a client address, before anyone is authenticated."""
        key = redis_keys.client_ip(address)
        clock = "" if clock_us is None else clock_us
        args: list[Arg] = ["", "", clock, endpoint, 0, mode.value, "", 0, "", 0, 0, policies]
        return parse(await self._script([key] * 8, args))


async def run(
    connection: Pipelined, script: str, sha: str, keys: list[str], args: list[Arg]
) -> Any:
    """EVALSHA, loading the script first when this Redis does not know it yet."""
    packed = pack(b"EVALSHA", sha, len(keys), *keys, *args)
    try:
        return await connection.execute(packed)
    except ResponseError as exc:
        if not str(exc).startswith("NOSCRIPT"):
            raise
    await connection.execute(pack(b"SCRIPT", b"LOAD", script))
    return await connection.execute(packed)


def decision_keys(
    customer: str, meter: str, now: datetime, last: str, tz: ZoneInfo | None = None
) -> tuple[list[str], tuple[int, int]]:
    """The keys a decision on ``meter`` reads and writes (``enforce.lua`` and
    ``lease.lua`` alike), and the quota period (start, end in ms) ``now`` falls in: the
    calendar month in the customer's billing zone ``tz`` (None: UTC).  ``last`` is the
    one key the two scripts use differently: a decision's end user's rate states, a
    lease request's stored answer."""
    month, start_ms, end_ms = _period(quota_month(now, tz))
    keys = [
        redis_keys.account(customer),
        redis_keys.api_keys(customer),
        redis_keys.rate_states(customer),
        redis_keys.reservations(customer),
        redis_keys.reservation_expiries(customer),
        redis_keys.held(customer),
        redis_keys.counters(customer, meter, Window.MONTH, month),
        last,
    ]
    return keys, (start_ms, end_ms)


@functools.lru_cache(maxsize=1024)
def _period(month: QuotaMonth) -> tuple[str, int, int]:
    """The quota month's bucket id, start and end in ms."""
    return month.bucket, epoch_ms(month.start), epoch_ms(month.end)


def parse(raw: bytes) -> Outcome:
    return parse_body(orjson.loads(raw))


def parse_body(body: dict[str, Any]) -> Outcome:
    limits = tuple(_limit(item) for item in body.get("l") or ())
    violated = body.get("v") or 0
    return Outcome(
        code=Code(body["c"]),
        plan=body.get("p") or "",
        status=body.get("s") or "",
        upgrade=body.get("u") or None,
        limits=limits,
        violated=limits[violated - 1] if violated else None,
        reserved=bool(body.get("r")),
        grace_ended_ms=body.get("g") or 0,
        legacy_headers=body.get("x") is True,
        policy=body.get("sp") or "",
    )


def _limit(item: dict[str, Any]) -> Limit:
    if item["k"] == "quota":  # amounts in micro-units, as strings
        return Limit(
            item["n"],
            "quota",
            from_micros(int(item["lim"])),
            from_micros(int(item["rem"])),
            item["reset"],
            item["retry"],
            item["w"],
            hard=item["h"],
        )
    return Limit(
        item["n"],
        "rate",
        Decimal(item["lim"]),
        Decimal(item["rem"]),
        item["reset"],
        item["retry"],
        item["w"],
        algorithm=item["a"],
    )
