"""A synthetic workload and, computed independently of Tally, what it must add up to.

The expectations use plain Python over the generated events — no Tally code — so the
pipeline's numbers are checked against a second opinion.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import redis

from schemas import redis_keys
from schemas.events import from_micros
from schemas.windows import Window
from services.common.clickhouse import ClickHouse

ENDPOINTS = ["/v1/search", "/v1/orders", "/v1/export"]
Key = tuple[str, str, date, str]  # customer, meter, day or month start, group ('*' or endpoint)


@dataclass
class Workload:
    tenant: str
    valid: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]
    invalid: list[dict[str, Any]]
    daily: dict[Key, Decimal] = field(default_factory=dict)
    monthly: dict[Key, Decimal] = field(default_factory=dict)

    def totals(self) -> dict[str, tuple[int, Decimal]]:
        """Per event type: how many distinct valid events, and the sum of their values."""
        found: dict[str, tuple[int, Decimal]] = {}
        for event in self.valid:
            count, total = found.get(event["type"], (0, Decimal(0)))
            found[event["type"]] = (count + 1, total + Decimal(event["data"].get("value", 1)))
        return found

    def requests(self, size: int, rng: random.Random) -> list[list[dict[str, Any]]]:
        """Split into requests; every duplicate goes in a later request than its original."""
        firsts = self.valid + self.invalid
        rng.shuffle(firsts)
        batches = [firsts[i : i + size] for i in range(0, len(firsts), size)]
        tail = list(self.duplicates)
        rng.shuffle(tail)
        batches.append(tail)
        return [b for b in batches if b]


def generate(
    tenant: str,
    customers: int,
    events: int,
    now: datetime,
    duplicate_share: float = 0.05,
    invalid_share: float = 0.01,
    spread: timedelta = timedelta(hours=30),
    seed: int = 1,
) -> Workload:
    rng = random.Random(seed)
    n_invalid = int(events * invalid_share)
    n_duplicates = int(events * duplicate_share)
    n_valid = events - n_invalid - n_duplicates
    names = [f"{tenant}-c{i:03d}" for i in range(customers)]
    valid = [_event(rng, rng.choice(names), now - spread * rng.random()) for _ in range(n_valid)]
    duplicates = [dict(e) for e in rng.sample(valid, n_duplicates)]
    invalid = [_invalid(rng, rng.choice(names), now) for _ in range(n_invalid)]
    workload = Workload(tenant, valid, duplicates, invalid)
    workload.daily = expected(valid, lambda t: t.date())
    workload.monthly = expected(valid, lambda t: t.date().replace(day=1))
    return workload


def expected(events: list[dict[str, Any]], bucket: Any) -> dict[Key, Decimal]:
    counts: dict[Key, Decimal] = defaultdict(Decimal)
    maxima: dict[Key, Decimal] = {}
    users: dict[Key, set[str]] = defaultdict(set)
    for e in events:
        at = bucket(datetime.fromisoformat(e["time"]).astimezone(UTC))
        customer, data = e["subject"], e["data"]
        if e["type"] == "api_call":
            counts[(customer, "api_calls", at, "*")] += 1
            counts[(customer, "api_calls", at, data["endpoint"])] += 1
        elif e["type"] == "compute":
            counts[(customer, "compute_seconds", at, "*")] += Decimal(data["value"])
        elif e["type"] == "storage":
            key = (customer, "storage_gb", at, "*")
            maxima[key] = max(maxima.get(key, Decimal(0)), Decimal(data["value"]))
        elif e["type"] == "user":
            users[(customer, "active_users", at, "*")].add(data["user"])
    result = dict(counts) | maxima
    result |= {k: Decimal(len(v)) for k, v in users.items()}
    return result


def _event(rng: random.Random, customer: str, at: datetime) -> dict[str, Any]:
    kind = rng.choices(["api_call", "compute", "storage", "user"], weights=[70, 12, 8, 10])[0]
    data: dict[str, Any]
    if kind == "api_call":
        data = {"endpoint": rng.choice(ENDPOINTS), "method": "GET", "status": 200}
    elif kind == "compute":
        data = {"value": str(Decimal(rng.randint(1, 10**7)) / 10**6)}
    elif kind == "storage":
        data = {"value": str(Decimal(rng.randint(1, 5 * 10**5)) / 10**3)}
    else:
        data = {"user": f"u{rng.randint(1, 40)}"}
    return {
        "specversion": "1.0",
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "source": f"svc-{rng.randint(1, 3)}",
        "type": kind,
        "subject": customer,
        "time": at.isoformat(),
        "data": data,
    }


def _invalid(rng: random.Random, customer: str, now: datetime) -> dict[str, Any]:
    event = _event(rng, customer, now)
    flaw = rng.choice(["value", "subject", "future", "specversion"])
    if flaw == "value":
        event["data"] = {"value": "twelve"}
    elif flaw == "subject":
        del event["subject"]
    elif flaw == "future":
        event["time"] = (now + timedelta(hours=1)).isoformat()
    else:
        event["specversion"] = "0.3"
    return event


def stored_totals(client: ClickHouse, tenant: str) -> dict[str, tuple[int, Decimal]]:
    """What ClickHouse holds for a tenant's customers, deduplicated, per event type."""
    rows = client.query(
        f"SELECT type, count(), toString(sum(value)) FROM {client.database}.events"
        " FINAL WHERE startsWith(customer, {tenant:String}) GROUP BY type",
        {"tenant": f"{tenant}-"},
    )
    return {kind: (count, Decimal(total)) for kind, count, total in rows}


def rollup_cells(database_url: str, table: str, tenant: str) -> dict[Key, Decimal]:
    """A tenant's rows of usage_daily or usage_monthly, keyed like the expectations."""
    column = "day" if table == "usage_daily" else "month"
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT customer, meter, {column}, group_key, value FROM {table}"
            " WHERE customer LIKE %s",
            (f"{tenant}-%",),
        ).fetchall()
    found: dict[Key, Decimal] = {}
    for customer, meter, bucket, group_key, value in rows:
        group = redis_keys.parse_group(group_key)
        found[(customer, meter, bucket, group[0] if group else "*")] = value.normalize() + 0
    return found


def live_counters(redis_url: str, want: dict[Key, Decimal]) -> dict[Key, Decimal]:
    """The aggregator's daily Redis counters for each cell of ``want``."""
    client = redis.Redis.from_url(redis_url)
    found = {}
    for customer, meter, day, group in want:
        key = redis_keys.counters(customer, meter, Window.DAY, day.strftime("%Y%m%d"))
        found[(customer, meter, day, group)] = from_micros(int(client.hget(key, group) or 0))
    client.close()
    return found
