"""Plans: what a customer pays, what is included, and how fast and how much they may use.

A plan is data in the catalog (and in PostgreSQL, editable over the admin API), never a
constant in code.  Rate limits bound requests per second/minute/hour/day; quotas bound
a meter's usage per billing period, either hard (refuse beyond the limit) or soft
(allow, and bill the overage).  Amounts are decimals: money never passes through floats.
"""

from __future__ import annotations

from collections.abc import Set
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

PLAN_ID_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
POLICY_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

Money = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=8)]
Units = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]


class Interval(StrEnum):
    MONTH = "month"
    YEAR = "year"


class Cycle(StrEnum):
    """Where billing periods start: on calendar months (or years), or on the day of the
    month the subscription started (its anniversary; the 31st falls back to the last day
    of shorter months)."""

    CALENDAR = "calendar"
    ANNIVERSARY = "anniversary"


class Per(StrEnum):
    """The window a rate limit counts over."""

    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return {"second": 1, "minute": 60, "hour": 3600, "day": 86400}[self.value]


class Algorithm(StrEnum):
    """How a rate limit decides; ``token_bucket`` unless a policy says otherwise.

    token_bucket and gcra both allow ``burst`` at once and then ``limit`` per window,
    smoothly; sliding_window weighs the previous window's count by how much of it still
    overlaps; fixed_window resets at each window boundary (cheapest, allows 2x at edges).
    """

    TOKEN_BUCKET = "token_bucket"
    GCRA = "gcra"
    SLIDING_WINDOW = "sliding_window"
    FIXED_WINDOW = "fixed_window"


class LimitScope(StrEnum):
    """What a rate limit counts separately, beyond the customer (always its scope)."""

    KEY = "key"  # each of the customer's API keys (service tokens share one count)
    END_USER = "end_user"  # each end user of the customer's app: `end_user` of the call
    ENDPOINT = "endpoint"  # each endpoint called


SCOPE_LETTERS = {LimitScope.KEY: "k", LimitScope.END_USER: "u", LimitScope.ENDPOINT: "e"}


class RateLimit(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=POLICY_NAME_PATTERN)]
    limit: Annotated[int, Field(gt=0, le=10**6)]
    per: Per
    burst: Annotated[int | None, Field(gt=0, le=10**6)] = Field(
        None, description="Calls allowed at once (token_bucket, gcra); default `limit`."
    )
    algorithm: Algorithm = Algorithm.TOKEN_BUCKET
    endpoint: str | None = Field(
        None, description="Only calls to this endpoint count against this limit."
    )
    scope: tuple[LimitScope, ...] = Field(
        (),
        description="Counted separately per API key, end user and/or endpoint (combined:"
        " [key, endpoint] is a limit for each key on each endpoint); empty: the customer"
        " as a whole.",
    )

    @property
    def capacity(self) -> int:
        return self.burst or self.limit

    @property
    def scope_letters(self) -> str:
        """The scope as the enforcement script reads it: k, u, e in that order."""
        return "".join(SCOPE_LETTERS[s] for s in LimitScope if s in self.scope)

    @model_validator(mode="after")
    def _exact(self) -> Self:
        # GCRA counts in whole microseconds per call: at most 1,000 calls a millisecond
        # keeps its rounding below 0.1 %.
        if self.algorithm is Algorithm.GCRA and self.limit > self.per.seconds * 1000:
            raise ValueError("gcra allows at most 1000 calls per millisecond of window")
        if len(set(self.scope)) != len(self.scope):
            raise ValueError("scope names each of key, end_user and endpoint at most once")
        return self


class Enforcement(StrEnum):
    HARD = "hard"  # refuse beyond the limit
    SOFT = "soft"  # allow beyond the limit; the overage is billed


class Quota(BaseModel):
    """Usage of one meter per billing period."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: Units
    enforcement: Enforcement = Enforcement.HARD


class PriceModel(StrEnum):
    PER_UNIT = "per_unit"  # every unit beyond the included ones at unit_price
    GRADUATED = "graduated"  # each unit at the price of the tier it falls in
    VOLUME = "volume"  # every unit at the price of the tier the total reaches
    PACKAGE = "package"  # unit_price per started package of package_size units


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    up_to: Units | None = Field(None, description="Inclusive upper bound; null = no bound.")
    unit_price: Money
    flat_price: Money = Decimal(0)


UNLIMITED = "unlimited"


class Price(BaseModel):
    """How one meter's usage in a billing period becomes money.

    ``included`` units are deducted before the model prices the rest (``unlimited``: all
    usage is included, shown on the invoice at no charge); ``minimum`` is the least the
    line costs for a billed stretch of the period, whatever the usage.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: PriceModel = PriceModel.PER_UNIT
    included: Units | Literal["unlimited"] = Decimal(0)
    unit_price: Money | None = None
    package_size: Units | None = None
    tiers: tuple[Tier, ...] = ()
    minimum: Money = Decimal(0)

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        tiered = self.model in (PriceModel.GRADUATED, PriceModel.VOLUME)
        if tiered != bool(self.tiers):
            raise ValueError("graduated and volume prices need tiers; other models take none")
        if not tiered and self.unit_price is None:
            raise ValueError(f"{self.model} prices need unit_price")
        if (self.model is PriceModel.PACKAGE) != (self.package_size is not None):
            raise ValueError("package_size goes with (and only with) the package model")
        if self.package_size is not None and self.package_size <= 0:
            raise ValueError("package_size must be positive")
        bounds = [t.up_to for t in self.tiers]
        if bounds and (bounds[-1] is not None or None in bounds[:-1]):
            raise ValueError("only the last tier is unbounded (up_to: null), and it must be")
        finite = [b for b in bounds if b is not None]
        if finite != sorted(set(finite)):
            raise ValueError("tier bounds must increase")
        return self


MAX_THRESHOLDS = 10
MAX_PERCENT = Decimal(1000)


class AlertDefaults(BaseModel):
    """The alerts every customer on a plan gets: ``percent`` of every quota, and of the
    included units of every priced meter without a quota (``[]``: none)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    percent: tuple[Annotated[Decimal, Field(gt=0, le=MAX_PERCENT, decimal_places=4)], ...] = Field(
        (), max_length=MAX_THRESHOLDS
    )

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if len(set(self.percent)) != len(self.percent):
            raise ValueError("alert percentages must be distinct")
        return self


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Annotated[str, Field(pattern=PLAN_ID_PATTERN)]
    name: Annotated[str, Field(min_length=1, max_length=100)]
    description: str = ""
    price: Money = Decimal(0)
    currency: Annotated[str, Field(pattern=r"^[a-z]{3}$")] = "usd"
    interval: Interval = Interval.MONTH
    cycle: Cycle = Cycle.CALENDAR
    trial_days: Annotated[int, Field(ge=0, le=365)] = 0
    prices: dict[str, Price] = Field(default_factory=dict, description="Usage prices by meter.")
    quotas: dict[str, Quota] = Field(default_factory=dict, description="Limits by meter.")
    rate_limits: tuple[RateLimit, ...] = ()
    endpoint_costs: dict[str, Annotated[int, Field(gt=0, le=10**6)]] = Field(
        default_factory=dict,
        description="What one call to an expensive endpoint counts against rate limits.",
    )
    features: tuple[str, ...] = ()
    upgrade_to: str | None = Field(None, description="The plan refusals point to.")
    legacy_ratelimit_headers: bool = Field(
        False,
        description="Also answer `X-RateLimit-Limit`, `X-RateLimit-Remaining` and"
        " `X-RateLimit-Reset` (Unix seconds) beside the IETF `RateLimit` fields, for clients"
        " written against them; they describe the policy closest to refusing.",
    )
    public: bool = Field(True, description="Offered at sign-up.")
    alerts: AlertDefaults = Field(
        default_factory=AlertDefaults, description="The alerts every customer gets."
    )

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        names = [r.name for r in self.rate_limits]
        if len(set(names)) != len(names):
            raise ValueError("rate limit names must be unique within a plan")
        for endpoint, cost in self.endpoint_costs.items():
            for rate in self.rate_limits:
                if rate.endpoint in (None, endpoint) and cost > min(rate.limit, rate.capacity):
                    raise ValueError(
                        f"a call to {endpoint} costs {cost}, more than {rate.name!r} ever allows"
                    )
        if self.upgrade_to == self.id:
            raise ValueError("a plan cannot upgrade to itself")
        return self


def check_plan(plan: Plan, meters: Set[str], additive: Set[str], plans: Set[str]) -> None:
    """What a plan refers to must exist: its meters, its upgrade path.  Quotas need
    meters whose usage adds up over a period (count, sum)."""
    for meter in {*plan.prices, *plan.quotas}:
        if meter not in meters:
            raise ValueError(f"plan {plan.id!r} refers to unknown meter {meter!r}")
    for meter in plan.quotas:
        if meter not in additive:
            raise ValueError(
                f"plan {plan.id!r}: a quota needs a count or sum meter; {meter!r} is not"
            )
    if plan.upgrade_to is not None and plan.upgrade_to not in plans:
        raise ValueError(f"plan {plan.id!r} upgrades to unknown plan {plan.upgrade_to!r}")
