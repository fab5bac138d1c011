"""Alert rules compiled into the usage levels the aggregator checks on every batch.

The aggregator knows neither plans nor money: it compares a meter's month total with a
sorted list of micro-unit levels (``schemas.alerts``).  This module turns a customer's
plan defaults (percent of every quota, else of the included units) and own rules
(percent, absolute usage, spend on one meter) into those levels and writes them to
``redis_keys.alerts``; spend rules on the whole invoice are no level of one meter, so
the hash only says the customer has some (``SPEND_FIELD``), and billing rates them
(``alerts.invoice``).  It runs when a rule is added or removed (in the request), when the
customer's plan changes (``on_notification``), and for everyone at billing start and
every few minutes (which also picks up catalog edits).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from decimal import Decimal, localcontext

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from schemas import redis_keys
from schemas.alerts import PLAN_RULE, SPEND_FIELD, AlertKind, Threshold, encode
from schemas.events import utcnow
from schemas.notifications import Notification, NotificationType
from schemas.plans import Plan
from services.billing.notification.alerts import rules
from services.billing.notification.alerts.rules import Rule
from services.billing.notification.alerts.spend import ceil_micros, micros_for
from services.billing.rating.money import EXACT
from services.common.catalog import read_plan
from services.common.logging import get_logger

log = get_logger("tally.billing.alerts")

HUNDRED = Decimal(100)
PAGE = 500  # customers recompiled per query in ``AlertCompiler.everyone``


class RuleError(ValueError):
    """A rule that cannot apply to the customer's plan; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def reference(plan: Plan, meter: str) -> Decimal | None:
    """What a percentage is of: the meter's quota, else its included units (None: neither)."""
    quota = plan.quotas.get(meter)
    if quota is not None and quota.limit > 0:
        return quota.limit
    price = plan.prices.get(meter)
    if price is not None and isinstance(price.included, Decimal) and price.included > 0:
        return price.included
    return None


def plan_thresholds(plan: Plan) -> dict[str, list[Threshold]]:
    """The plan's default alerts, per meter."""
    found: dict[str, list[Threshold]] = {}
    for meter in sorted({*plan.quotas, *plan.prices}):
        limit = reference(plan, meter)
        if limit is not None and plan.alerts.percent:
            found[meter] = [_percent(limit, p, PLAN_RULE) for p in plan.alerts.percent]
    return found


def rule_thresholds(plan: Plan, rule: Rule) -> list[Threshold | None]:
    """Each of a rule's thresholds on this plan (None: a spend no usage ever reaches).

    Raises ``RuleError`` when the rule cannot apply to the plan at all.  A spend rule on
    the whole invoice has no usage level: use ``rules.whole_invoice`` first.
    """
    if rule.meter is None:
        raise RuleError("meter", f"a {rule.kind} alert needs a meter")
    match rule.kind:
        case AlertKind.PERCENT:
            limit = reference(plan, rule.meter)
            if limit is None:
                raise RuleError(
                    "meter",
                    f"plan {plan.id!r} has no quota or included units of {rule.meter!r}"
                    " for a percentage to refer to",
                )
            return [_percent(limit, value, rule.id) for value in rule.thresholds]
        case AlertKind.USAGE:
            return [
                Threshold(ceil_micros(value), AlertKind.USAGE, value, rule.id)
                for value in rule.thresholds
            ]
        case AlertKind.SPEND:
            if rule.meter not in plan.prices:
                raise RuleError("meter", f"plan {plan.id!r} has no price for {rule.meter!r}")
            return [_spend(plan, rule.meter, rule.id, value) for value in rule.thresholds]


def compiled(plan: Plan, customer_rules: Iterable[Rule]) -> dict[str, str]:
    """Every meter's encoded levels: plan defaults first (they win a tie of equal
    quantities), then the rules in the order they were added."""
    by_meter: dict[str, list[Threshold]] = defaultdict(list, plan_thresholds(plan))
    whole_invoice = False
    for rule in customer_rules:
        if rules.whole_invoice(rule):
            whole_invoice = True
            continue
        assert rule.meter is not None  # only whole-invoice spend rules have none
        try:
            found = rule_thresholds(plan, rule)
        except RuleError:  # the plan changed under the rule: it waits for a plan it fits
            continue
        by_meter[rule.meter] += [t for t in found if t is not None]
    encoded = {meter: encode(levels) for meter, levels in by_meter.items() if levels}
    if whole_invoice:
        encoded[SPEND_FIELD] = "1"
    return encoded


def _percent(limit: Decimal, value: Decimal, rule: str) -> Threshold:
    with localcontext(EXACT):
        quantity = ceil_micros(limit * value / HUNDRED)
    return Threshold(quantity, AlertKind.PERCENT, value, rule, limit=limit)


def _spend(plan: Plan, meter: str, rule: str, value: Decimal) -> Threshold | None:
    quantity = micros_for(plan, meter, value)
    if quantity is None:
        return None
    return Threshold(quantity, AlertKind.SPEND, value, rule, currency=plan.currency)


class AlertCompiler:
    """Writes customers' compiled levels to Redis, one atomic replace per customer."""

    def __init__(self, pool: AsyncConnectionPool, redis: Redis) -> None:
        self._pool = pool
        self._redis = redis

    async def customer(self, customer: str) -> dict[str, str] | None:
        """Recompile one customer (None: no such customer)."""
        async with self._pool.connection() as conn:
            plan = await plan_of(conn, customer)
            if plan is None:
                return None
            levels = compiled(plan, await rules.listed(conn, customer))
        await self._write(customer, levels)
        return levels

    async def everyone(self) -> int:
        """Recompile every customer: the safety net behind the event-driven recompiles."""
        after, done = "", 0
        while True:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT id FROM customers WHERE id > %s ORDER BY id LIMIT %s", (after, PAGE)
                )
                ids = [row[0] for row in await cur.fetchall()]
            for customer in ids:
                await self.customer(customer)
            done += len(ids)
            if len(ids) < PAGE:
                return done
            after = ids[-1]

    async def on_notification(self, notification: Notification) -> None:
        """The notifier's listener: a plan change recompiles the customer's alerts."""
        if notification.type is NotificationType.PLAN_CHANGED:
            await self.customer(notification.customer)

    async def _write(self, customer: str, levels: dict[str, str]) -> None:
        """Replace the levels; a customer with whole-invoice spend rules is also marked
        due, so a new rule (and every safety-net pass) evaluates the invoice so far."""
        key = redis_keys.alerts(customer)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if levels:
                fields: dict[FieldT, EncodableT] = {m: v for m, v in levels.items()}
                pipe.hset(key, mapping=fields)
            await pipe.execute()
        if SPEND_FIELD in levels:
            await mark_due(self._redis, [customer])


async def mark_due(redis: Redis, customers: Sequence[str]) -> None:
    """Have billing's ``SpendWatch`` evaluate these customers' whole-invoice spend rules
    next (a customer already due keeps its place)."""
    if customers:
        now_ms = int(utcnow().timestamp() * 1000)
        await redis.zadd(redis_keys.SPEND_DUE, dict.fromkeys(customers, now_ms), nx=True)


async def plan_of(conn: AsyncConnection, customer: str) -> Plan | None:
    """The plan ``customer`` is on now; ``None`` for an unknown customer."""
    cur = await conn.execute("SELECT plan_id FROM customers WHERE id = %s", (customer,))
    row = await cur.fetchone()
    return None if row is None else await read_plan(conn, row[0])
