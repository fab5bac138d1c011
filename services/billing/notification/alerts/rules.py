"""A customer's own alert rules (table ``alert_rules``): added, listed, removed.

A rule is one meter (or none: a spend rule on the whole invoice), one kind and 1-10
thresholds; the plan's defaults are not rows
here (they live in the catalog, on the plan).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from psycopg import AsyncConnection

from schemas.alerts import AlertKind


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    meter: str | None  # None: a spend rule on the whole invoice to date
    kind: AlertKind
    thresholds: tuple[Decimal, ...]
    created_at: datetime


def new_rule_id() -> str:
    return f"alr_{secrets.token_hex(8)}"


async def listed(conn: AsyncConnection, customer: str) -> list[Rule]:
    cur = await conn.execute(
        "SELECT id, meter, kind, thresholds, created_at FROM alert_rules"
        " WHERE customer_id = %s ORDER BY created_at, id",
        (customer,),
    )
    return [
        Rule(rid, meter, AlertKind(kind), tuple(values), at)
        for rid, meter, kind, values, at in await cur.fetchall()
    ]


async def add(
    conn: AsyncConnection, customer: str, meter: str | None, kind: AlertKind, values: list[Decimal]
) -> Rule:
    rule_id = new_rule_id()
    cur = await conn.execute(
        "INSERT INTO alert_rules (id, customer_id, meter, kind, thresholds)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING created_at",
        (rule_id, customer, meter, kind.value, values),
    )
    row = await cur.fetchone()
    assert row is not None  # RETURNING always yields the row
    return Rule(rule_id, meter, kind, tuple(values), row[0])


async def remove(conn: AsyncConnection, customer: str, rule_id: str) -> bool:
    cur = await conn.execute(
        "DELETE FROM alert_rules WHERE id = %s AND customer_id = %s", (rule_id, customer)
    )
    return cur.rowcount == 1


def whole_invoice(rule: Rule) -> bool:
    """A spend rule on the whole invoice to date (billing rates it; no meter level)."""
    return rule.kind is AlertKind.SPEND and rule.meter is None
