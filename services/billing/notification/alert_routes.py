"""A customer's usage alerts over HTTP: the plan's defaults and the customer's own rules.

``GET`` lists both, each threshold with the usage level it fires at; ``POST`` adds a
rule and ``DELETE`` removes one, recompiling the customer's levels in the request so
the next batch the aggregator applies already checks them.  A service token or the admin
token manages any customer's alerts (as they do its webhook endpoints); a customer's key
reads its own (``usage:read``) and changes them (``billing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from schemas.alert_rules import AlertList, AlertRule, CompiledThreshold
from schemas.alerts import PLAN_RULE, AlertKind, Threshold
from schemas.api_keys import Scope
from schemas.events import CUSTOMER_ID_PATTERN, from_micros
from schemas.plans import MAX_PERCENT, MAX_THRESHOLDS, Plan
from schemas.problem_types import UNKNOWN_ALERT
from schemas.text import PRINTABLE_PATTERN
from services.billing.notification.access import Access
from services.billing.notification.alerts import rules
from services.billing.notification.alerts.compile import (
    AlertCompiler,
    RuleError,
    plan_of,
    plan_thresholds,
    reference,
    rule_thresholds,
)
from services.billing.notification.alerts.invoice import reachable
from services.billing.notification.alerts.rules import Rule
from services.common import catalog
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field, unknown_customer

Customer = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]
RuleId = Annotated[str, Path(pattern=PRINTABLE_PATTERN)]
MAX_RULES_PER_METER = 10
"""Bounds the levels the aggregator walks for a meter (10 rules of 10, plus the plan's)."""
Amount = Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=6)]


class NewAlertRule(BaseModel):
    """Thresholds on one meter: percent of the quota (else of the included units), usage
    in the meter's unit, or spend in the plan's currency (the invoice to date); a spend
    rule without a meter watches the whole invoice to date."""

    model_config = ConfigDict(extra="forbid")

    meter: str | None = Field(
        None,
        description="Required for percent and usage; for spend, absent (null) means the"
        " whole invoice to date (the plan's fee plus every priced meter's usage line),"
        " a meter name means the fee plus that meter's line.",
    )
    kind: AlertKind
    thresholds: list[Amount] = Field(min_length=1, max_length=MAX_THRESHOLDS)


def router(pool: AsyncConnectionPool, access: Access, compiler: AlertCompiler) -> APIRouter:
    api = APIRouter(tags=["alerts"], responses=problem_responses(401, 403, 404, 422, 429, 503))

    @api.get("/v1/customers/{customer}/alerts", summary="A customer's usage alerts")
    async def list_alerts(request: Request, customer: Customer) -> AlertList:
        await access.customer(request, customer, Scope.USAGE_READ)
        async with pool.connection() as conn:
            plan = await _plan(conn, customer)
            own = await rules.listed(conn, customer)
        return AlertList(customer=customer, plan=plan.id, alerts=_shown(plan, own))

    @api.post(
        "/v1/customers/{customer}/alerts",
        status_code=201,
        summary="Add an alert rule",
    )
    async def add_alert(request: Request, customer: Customer, body: NewAlertRule) -> AlertRule:
        await access.customer(request, customer, Scope.BILLING)
        async with pool.connection() as conn:
            plan = await _plan(conn, customer)
            await _check(conn, plan, body)
            same_meter = sum(r.meter == body.meter for r in await rules.listed(conn, customer))
            if same_meter >= MAX_RULES_PER_METER:
                raise invalid_field(
                    "body.meter",
                    f"{body.meter or 'the whole invoice'!r} has {MAX_RULES_PER_METER} rules"
                    " already; remove one",
                )
            rule = await rules.add(conn, customer, body.meter, body.kind, body.thresholds)
        await compiler.customer(customer)
        return _rule(plan, rule)

    @api.delete(
        "/v1/customers/{customer}/alerts/{rule_id}",
        status_code=204,
        response_class=Response,
        summary="Remove an alert rule",
    )
    async def remove_alert(
        request: Request,
        customer: Customer,
        rule_id: Annotated[str, Path(pattern=PRINTABLE_PATTERN)],
    ) -> None:
        await access.customer(request, customer, Scope.BILLING)
        async with pool.connection() as conn:
            await _plan(conn, customer)
            if not await rules.remove(conn, customer, rule_id):
                raise Problem(UNKNOWN_ALERT, f"customer {customer!r} has no alert {rule_id!r}")
        await compiler.customer(customer)

    return api


async def _plan(conn: AsyncConnection, customer: str) -> Plan:
    plan = await plan_of(conn, customer)
    if plan is None:
        raise unknown_customer(customer)
    return plan


async def _check(conn: AsyncConnection, plan: Plan, body: NewAlertRule) -> None:
    """Every way a rule can be wrong, each named by its field."""
    if body.meter is None and body.kind is not AlertKind.SPEND:
        raise invalid_field(
            "body.meter", f"a {body.kind} alert needs a meter (only spend may omit it)"
        )
    if body.meter is not None and body.meter not in {m.name for m in await catalog.meters(conn)}:
        raise invalid_field("body.meter", f"unknown meter {body.meter!r}")
    seen: set[Decimal] = set()
    for index, value in enumerate(body.thresholds):
        field = f"body.thresholds[{index}]"
        if value in seen:
            raise invalid_field(field, f"{value} is listed twice")
        seen.add(value)
        if body.kind is AlertKind.PERCENT and value > MAX_PERCENT:
            raise invalid_field(field, f"a percentage is at most {MAX_PERCENT}")
    draft = Rule("", body.meter, body.kind, tuple(body.thresholds), datetime.min)
    if rules.whole_invoice(draft):
        for index, value in enumerate(body.thresholds):
            if not reachable(plan, value):
                raise invalid_field(
                    f"body.thresholds[{index}]",
                    f"no usage brings the invoice to {value} {plan.currency} on plan {plan.id!r}",
                )
        return
    try:
        compiled = rule_thresholds(plan, draft)
    except RuleError as exc:
        raise invalid_field(f"body.{exc.field}", exc.reason) from None
    for index, threshold in enumerate(compiled):
        if threshold is None:
            raise invalid_field(
                f"body.thresholds[{index}]",
                f"no usage of {body.meter!r} brings the invoice to"
                f" {body.thresholds[index]} {plan.currency} on plan {plan.id!r}",
            )


def _shown(plan: Plan, own: Sequence[Rule]) -> list[AlertRule]:
    defaults = [
        AlertRule(
            id=PLAN_RULE,
            source="plan",
            meter=meter,
            kind=AlertKind.PERCENT,
            thresholds=[_compiled(t.value, t) for t in levels],
            limit=reference(plan, meter),
        )
        for meter, levels in plan_thresholds(plan).items()
    ]
    return defaults + [_rule(plan, rule) for rule in own]


def _rule(plan: Plan, rule: Rule) -> AlertRule:
    """A rule as listed; a whole-invoice spend rule has no usage level (``quantity``
    null): billing rates the invoice itself."""
    try:
        levels = rule_thresholds(plan, rule)
    except RuleError:  # the plan changed under the rule: it does not fire on this one
        levels = [None] * len(rule.thresholds)
    return AlertRule(
        id=rule.id,
        source="customer",
        meter=rule.meter,
        kind=rule.kind,
        thresholds=[_compiled(v, t) for v, t in zip(rule.thresholds, levels, strict=True)],
        limit=reference(plan, rule.meter)
        if rule.kind is AlertKind.PERCENT and rule.meter is not None
        else None,
        currency=plan.currency if rule.kind is AlertKind.SPEND else None,
        created_at=rule.created_at,
    )


def _compiled(value: Decimal, threshold: Threshold | None) -> CompiledThreshold:
    quantity = None if threshold is None else from_micros(threshold.quantity)
    return CompiledThreshold(value=value, quantity=quantity)
