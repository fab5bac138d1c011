"""An account as the enforcement script reads it: the Redis hash's fields and the compiled plan.

The accounts projection writes ``tally:{cust}:account`` (see ``schemas.redis_keys``); the
enforcement script (``schemas/lua/enforce.lua``) reads it in the same call that decides.
Both sides take the field names and the policy encoding from here, so neither can drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from schemas.events import to_micros
from schemas.plans import Enforcement, Plan, RateLimit

PLAN = "plan"
STATUS = "status"
TRIAL_ENDS = "trial_ends"  # ms since the epoch, '' when not trialing
POLICIES = "policies"  # JSON: the plan's limits, as ``compile_plan`` writes them
PAST_DUE_SINCE = "past_due_since"  # ms since the epoch, '' unless past_due

FIELDS = (PLAN, STATUS, TRIAL_ENDS, POLICIES, PAST_DUE_SINCE)
"""The fields in the order the script reads them with one HMGET."""


def epoch_ms(moment: datetime) -> int:
    """An instant as the enforcement script reads times: milliseconds since the epoch."""
    return int(moment.timestamp() * 1000)


def compile_rates(rates: tuple[RateLimit, ...]) -> list[dict[str, Any]]:
    """Each limit for the script; ``s`` (only when scoped) its scope's letters."""
    return [
        {
            "n": r.name,
            "a": r.algorithm.value,
            "l": r.limit,
            "w": r.per.seconds * 1000,
            "b": r.capacity,
            "e": r.endpoint or False,
        }
        | ({"s": r.scope_letters} if r.scope else {})
        for r in rates
    ]


def compile_plan(plan: Plan) -> str:
    """The plan's limits as the script reads them (JSON ``null`` would decode to a
    sentinel in Lua, hence ``false`` for absent values)."""
    return orjson.dumps(
        {
            "rates": compile_rates(plan.rate_limits),
            "costs": plan.endpoint_costs or {},
            "quotas": {
                meter: {"l": to_micros(q.limit), "h": q.enforcement is Enforcement.HARD}
                for meter, q in plan.quotas.items()
            }
            or {},
            "up": plan.upgrade_to or False,
            "x": plan.legacy_ratelimit_headers,
        }
    ).decode()


def compile_inline(rates: tuple[RateLimit, ...], costs: dict[str, int] | None = None) -> str:
    """Limits on something that is not a customer (a client address), passed inline."""
    return orjson.dumps(
        {"rates": compile_rates(rates), "costs": costs or {}, "quotas": {}}
    ).decode()
