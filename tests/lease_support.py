"""Leases below HTTP: an account written straight into Redis, events counted by the sink.

The lease script runs in the real Redis with its clock overridden, and the events spent
under a lease are counted by the aggregator's own Redis sink (``RedisSink.apply``, the
Lua call that counts and settles), so these tests exercise the same two scripts
production runs, only without HTTP and Kafka in between.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal

import orjson
from redis.asyncio import Redis

from schemas import account_state, redis_keys
from schemas.catalog import Catalog, Meter
from schemas.envelope import StoredEvent
from schemas.events import VALUE_SCALE, utcnow
from schemas.plans import RateLimit
from schemas.windows import Window, bucket_id
from services.aggregator import increments
from services.aggregator.dedupe import DedupeWindow
from services.aggregator.redis_sink import Apply, Outcome, RedisSink

METER = "api_calls"
ONE = Decimal(1)
_ids = itertools.count()


def catalog_meters() -> dict[str, list[Meter]]:
    index: dict[str, list[Meter]] = {}
    for meter in Catalog.default().meters:
        index.setdefault(meter.event_type, []).append(meter)
    return index


async def put_account(
    redis: Redis,
    customer: str,
    quota: int | None = None,
    rates: tuple[RateLimit, ...] = (),
    costs: dict[str, int] | None = None,
    hard: bool = True,
) -> None:
    """An active account whose plan has ``rates`` and a quota of ``quota`` calls."""
    policies = {
        "rates": account_state.compile_rates(rates),
        "costs": costs or {},
        "quotas": {METER: {"l": quota * VALUE_SCALE, "h": hard}} if quota is not None else {},
        "up": False,
    }
    await redis.hset(
        redis_keys.account(customer),
        mapping={
            account_state.PLAN: "test",
            account_state.STATUS: "active",
            account_state.TRIAL_ENDS: "",
            account_state.POLICIES: orjson.dumps(policies).decode(),
            account_state.PAST_DUE_SINCE: "",
        },
    )


def spent_events(customer: str, lease: str, calls: int) -> list[StoredEvent]:
    """The usage events of ``calls`` calls admitted from ``lease``."""
    now = utcnow()
    return [
        StoredEvent(f"e{next(_ids)}", "edge", "api_call", customer, now, ONE, {}, now, lease)
        for _ in range(calls)
    ]


async def count(
    redis: Redis, customer: str, events: Sequence[StoredEvent], meters: dict[str, list[Meter]]
) -> None:
    """Count ``events`` as the aggregator does: one atomic call of its Redis sink."""
    sink, dedupe, now = RedisSink(redis), DedupeWindow(timedelta(hours=24)), utcnow()
    field = redis_keys.offset_field("tally.events", 0, "lease-tests")
    [stored] = await sink.stored_offsets([(customer, field)])
    plan = Apply(
        customer=customer,
        offset_field=field,
        expected=stored,
        new_offset=(stored or 0) + 1,
        seen_keys=[dedupe.key(customer, b) for b in dedupe.live(now)],
        seen_expires_at=dedupe.expires_at(dedupe.current(now)),
        digests=[redis_keys.event_digest(e.source, e.id) for e in events],
        ops=increments.build(customer, events, meters, now),
    )
    [(outcome, seen, _)] = await sink.apply([plan])
    assert outcome is Outcome.APPLIED, (outcome, seen)


async def usage_and_held(redis: Redis, customer: str) -> tuple[int, int]:
    """This month's counted calls and the calls held (micro-units), as the scripts see them."""
    key = redis_keys.counters(customer, METER, Window.MONTH, bucket_id(Window.MONTH, utcnow()))
    used = int(await redis.hget(key, "*") or 0)
    held = int(await redis.hget(redis_keys.held(customer), METER) or 0)
    return used, held
