"""Quota status without spending: every limit of a customer's plan, as enforcement counts it.

A dashboard used to learn what is left by calling ``/v1/enforce``, which spends a token.
Here one read-only Lua call (``schemas/lua/limits.lua``, flagged ``no-writes`` so Redis
itself refuses any write) reads the very state ``enforce.lua`` decides on — the
account's compiled policies, the rate-limit states, the quota counters and the held
reservations — in one atomic snapshot.  A customer not projected into Redis yet is
projected first, as enforcement does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import lua, redis_keys
from schemas.account_state import PLAN, POLICIES, STATUS, TRIAL_ENDS, epoch_ms
from schemas.events import from_micros, utcnow
from schemas.plans import SCOPE_LETTERS
from schemas.windows import Window
from schemas.zones import quota_month
from services.api.accounts import projection
from services.api.enforcement.trials import end_trial
from services.common import catalog
from services.common.problems import unknown_customer
from services.common.settings import Settings
from services.common.zone_book import ZoneOf, in_utc

FIELDS = (PLAN, STATUS, POLICIES, TRIAL_ENDS)  # in the order limits.lua reads them
SCRIPT = lua.source(
    "limits",
    ACCOUNT_FIELDS=", ".join(f"'{f}'" for f in FIELDS),
    RELEASE=redis_keys.RELEASE_LUA,  # for ``holding``: how a reservation's value reads
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PolicyState:
    """One rate limit or quota now; amounts in units (rate limits: tokens), times in ms."""

    policy: str
    kind: str  # rate | quota
    limit: Decimal
    used: Decimal
    held: Decimal
    remaining: Decimal
    reset_ms: int
    window_ms: int
    meter: str | None = None  # quotas
    hard: bool | None = None  # quotas
    algorithm: str | None = None  # rate limits
    burst: int | None = None  # rate limits
    endpoint: str | None = None  # rate limits on one endpoint
    scope: tuple[str, ...] = ()  # rate limits counted per key, end user, endpoint


@dataclass(frozen=True, slots=True)
class LimitsStatus:
    plan: str
    status: str
    now_ms: int  # Redis's clock when it read the state
    limits: tuple[PolicyState, ...]
    endpoint_costs: dict[str, int]

    @property
    def as_of(self) -> datetime:
        return EPOCH + timedelta(milliseconds=self.now_ms)


@dataclass(frozen=True, slots=True)
class Facts:
    """Whose scoped rate limits to read: a key (''/None: service tokens), an endpoint,
    an end user ('' none: such limits read as for one not seen yet)."""

    key_id: str = ""
    endpoint: str = ""
    end_user: str = ""


SCOPES = {letter: scope.value for scope, letter in SCOPE_LETTERS.items()}


class LimitsReader:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: AsyncConnectionPool,
        zone_of: ZoneOf = in_utc,
    ) -> None:
        self._zone_of = zone_of
        self._settings = settings
        self._redis = redis
        self._pool = pool
        self._script = redis.register_script(SCRIPT)
        self._meters: tuple[str, ...] = ()  # the catalog's, read again when a quota's is new

    async def read(
        self,
        customer: str,
        now: datetime | None = None,
        clock_us: int | None = None,
        facts: Facts | None = None,
    ) -> LimitsStatus:
        """``now`` picks the quota period (the month holding it in the customer's billing
        zone, as enforcement has it; default now); ``clock_us`` overrides Redis's clock
        (tests).  Unknown customer: 404.

        What a decision would put right first is put right here too — an account not
        projected yet, a trial that ran out — so the limits told are those it will use."""
        now, facts = now or utcnow(), facts or Facts()
        body = await self._ask(customer, now, clock_us, facts)
        if body["c"] == "no_account":
            if not await projection.project_customer(self._redis, self._pool, customer):
                raise unknown_customer(customer)
            body = await self._ask(customer, now, clock_us, facts)
        if body["c"] == "ok" and _trial_over(body):
            await end_trial(self._settings, self._redis, self._pool, customer)
            body = await self._ask(customer, now, clock_us, facts)
        if body["c"] == "ok" and body.get("x"):  # a quota on a meter this process never saw
            self._meters = tuple(m.name for m in await catalog.read_meters(self._pool))
            body = await self._ask(customer, now, clock_us, facts)
        if body["c"] != "ok" or body.get("x"):
            raise RuntimeError(f"limits of {customer} unreadable: {body}")
        return parse(body)

    async def _ask(
        self, customer: str, now: datetime, clock_us: int | None, facts: Facts
    ) -> dict[str, Any]:
        month = quota_month(now, self._zone_of(customer))
        keys = [
            redis_keys.account(customer),
            redis_keys.rate_states(customer),
            redis_keys.reservations(customer),
            redis_keys.reservation_expiries(customer),
            redis_keys.held(customer),
            redis_keys.end_user_rate_states(customer, facts.end_user),
            *(
                redis_keys.counters(customer, meter, Window.MONTH, month.bucket)
                for meter in self._meters
            ),
        ]
        period = [epoch_ms(month.start), epoch_ms(month.end)]
        clock = "" if clock_us is None else clock_us
        args = [clock, *period, facts.key_id or "-", facts.endpoint, facts.end_user, *self._meters]
        raw = await self._script(keys=keys, args=args)
        found: dict[str, Any] = orjson.loads(raw)
        return found


def _trial_over(body: dict[str, Any]) -> bool:
    return body["s"] == "trial" and bool(body.get("e")) and int(body["e"]) <= int(body["t"])


def parse(body: dict[str, Any]) -> LimitsStatus:
    limits = [_policy(item) for item in body.get("l") or ()]
    rates = [p for p in limits if p.kind == "rate"]
    quotas = sorted((p for p in limits if p.kind == "quota"), key=lambda p: p.policy)
    return LimitsStatus(
        plan=body["p"],
        status=body["s"],
        now_ms=int(body["t"]),
        limits=(*rates, *quotas),
        endpoint_costs={str(e): int(c) for e, c in (body.get("k") or {}).items()},
    )


def _policy(item: dict[str, Any]) -> PolicyState:
    if item["k"] == "quota":  # amounts in micro-units, as strings
        return PolicyState(
            item["n"],
            "quota",
            from_micros(int(item["lim"])),
            from_micros(int(item["used"])),
            from_micros(int(item["held"])),
            from_micros(int(item["rem"])),
            int(item["reset"]),
            int(item["w"]),
            meter=item["m"],
            hard=bool(item["h"]),
        )
    return PolicyState(
        item["n"],
        "rate",
        Decimal(item["lim"]),
        Decimal(item["used"]),
        Decimal(0),
        Decimal(item["rem"]),
        int(item["reset"]),
        int(item["w"]),
        algorithm=item["a"],
        burst=int(item["b"]),
        endpoint=item["e"] or None,
        scope=tuple(SCOPES[letter] for letter in item.get("s") or ""),
    )
