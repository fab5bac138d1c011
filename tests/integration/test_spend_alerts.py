"""Spend alerts on the whole invoice to date (``alerts/invoice.py``), end to end through
the real pieces: usage applied by the aggregator's sink (which marks the customer), the
mark handed over by the alert publisher, and billing's ``SpendWatch`` rating the live
month counters and publishing onto the notification stream.

The customer is on the default catalog's ``payg`` plan: every meter priced in graduated
tiers, so the invoice to date is the sum of several meters' lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import httpx
import orjson
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.envelope import StoredEvent
from schemas.events import utcnow
from schemas.notifications import STREAM, NotificationType
from schemas.windows import Window, bucket_start, next_bucket
from schemas.zones import quota_month, zone
from services.aggregator.alerts import AlertPublisher
from services.billing.notification.alerts.compile import plan_of
from services.billing.notification.alerts.invoice import SpendWatch
from services.billing.rating import engine as rating
from services.common.meter_cache import MeterCache
from services.common.settings import Settings
from tests.accounts_support import Account, running_api, sign_up
from tests.integration.test_alert_api import SERVICE, alerts_client
from tests.integration.test_alert_crossings import METERS, Feed

_ids = itertools.count()


def events(customer: str, kind: str, values: list[Decimal], at: datetime) -> list[StoredEvent]:
    return [
        StoredEvent(f"s{next(_ids)}", "src", kind, customer, at, value, {}, at) for value in values
    ]


def calls(customer: str, n: int, at: datetime) -> list[StoredEvent]:
    return events(customer, "api_call", [Decimal(1)] * n, at)


def compute(customer: str, seconds: str, at: datetime) -> list[StoredEvent]:
    return events(customer, "compute", [Decimal(seconds)], at)


async def fired(redis: Redis, customer: str) -> list[dict[str, Any]]:
    """The whole-invoice spend alerts on the stream for ``customer``, oldest first."""
    found = []
    entries: Any = await redis.xrange(STREAM)
    for _, fields in entries:
        note = orjson.loads(fields[b"n"])
        data = note["data"]
        if (
            note["type"] == NotificationType.ALERT_TRIGGERED
            and note["customer"] == customer
            and data["meter"] is None
        ):
            found.append(note)
    return found


async def invoice_now(pool: AsyncConnectionPool, customer: str, usage: dict[str, str]) -> Decimal:
    """The invoice to date as the billing run would write it: fee, then each priced
    meter's usage line, rounded per line (the invoicing code's own functions)."""
    async with pool.connection() as conn:
        plan = await plan_of(conn, customer)
    assert plan is not None
    start = bucket_start(Window.MONTH, utcnow())
    end = next_bucket(Window.MONTH, start)
    lines = [rating.fee_line(plan, Decimal(1), start, end)] + [
        rating.usage_line(plan, meter, Decimal(usage.get(meter, "0")), start, end)
        for meter in sorted(plan.prices)
    ]
    return rating.total(lines)


@pytest.fixture
async def payg(settings: Settings) -> Account:
    async with running_api(settings) as api:
        return await sign_up(api, plan="payg")


async def add_rule(
    client: httpx.AsyncClient, customer: str, thresholds: list[str], meter: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "spend", "thresholds": thresholds}
    if meter is not None:
        body["meter"] = meter
    reply = await client.post(f"/v1/customers/{customer}/alerts", json=body, headers=SERVICE)
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


async def settle(publisher: AlertPublisher, watch: SpendWatch, customer: str) -> None:
    """What the running services do after a batch: hand the mark over, evaluate."""
    await publisher.drain([customer])
    await watch.drain()


async def test_fires_when_the_whole_invoice_first_reaches_the_amount_to_the_cent(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, payg: Account
) -> None:
    customer, now = payg.customer, utcnow()
    async with alerts_client(settings, pool, redis) as client:
        rule = await add_rule(client, customer, ["10.00"])
        listed = (await client.get(f"/v1/customers/{customer}/alerts", headers=SERVICE)).json()
    [shown] = [r for r in listed["alerts"] if r["id"] == rule["id"]]
    assert shown["meter"] is None and shown["currency"] == "usd"
    assert shown["thresholds"] == [{"value": "10.00", "quantity": None}]

    feed = Feed(redis, customer, METERS)
    publisher, watch = AlertPublisher(redis, lambda: METERS), SpendWatch(pool, redis)
    await watch.drain()  # the rule's compile marked it due: nothing spent yet
    # 15,000 calls: 10,000 free, 5,000 at $0.001 = $5.00
    await feed.send(calls(customer, 15_000, now))
    # 4,598 compute seconds: 3,600 free, 998 at $0.005 = $4.99 -> $9.99 in all
    await feed.send(compute(customer, "4598", now))
    assert await redis.exists(redis_keys.spend_mark(customer))
    await settle(publisher, watch, customer)
    assert not await redis.exists(redis_keys.spend_mark(customer))  # handed over
    usage = {"api_calls": "15000", "compute_seconds": "4598"}
    assert await invoice_now(pool, customer, usage) == Decimal("9.99")
    assert await fired(redis, customer) == []  # one meter alone is far below: $5.00, $4.99

    # 1 more second: $0.005 more; the line rounds half up to $5.00 -> $10.00
    await feed.send(compute(customer, "1", now))
    await settle(publisher, watch, customer)
    usage["compute_seconds"] = "4599"
    assert await invoice_now(pool, customer, usage) == Decimal("10.00")
    [alert] = await fired(redis, customer)
    data = alert["data"]
    assert data["threshold"] == {"kind": "spend", "value": "10.00", "quantity": None}
    assert (data["amount"], data["currency"], data["rule"]) == ("10.00", "usd", rule["id"])
    assert data["meters"] == {"api_calls": "15000", "compute_seconds": "4599"}


async def test_only_the_highest_once_through_replays_restarts_and_new_periods(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, payg: Account
) -> None:
    customer, now = payg.customer, utcnow()
    async with alerts_client(settings, pool, redis) as client:
        await add_rule(client, customer, ["1", "2", "3", "50"])
    feed = Feed(redis, customer, METERS)
    publisher, watch = AlertPublisher(redis, lambda: METERS), SpendWatch(pool, redis)
    batch = calls(customer, 11_000, now) + compute(customer, "3900", now)  # $1.00 + $1.50
    assert (await feed.send(batch)).name == "APPLIED"
    await feed.send(calls(customer, 500, now))  # $3.00: 1, 2 and 3 crossed, 3 fires
    await settle(publisher, watch, customer)
    assert [a["data"]["threshold"]["value"] for a in await fired(redis, customer)] == ["3"]

    [stored] = await feed.sink.stored_offsets([(customer, feed.field)])
    assert stored is not None
    await feed.send(calls(customer, 500, now), offset=stored)  # a replay: already applied
    await settle(publisher, watch, customer)
    restarted = SpendWatch(pool, redis)  # a new evaluator: no memory but Redis
    assert await restarted.evaluate(customer) == 0
    await redis.delete(redis_keys.spend_fired(customer))  # even without the marker
    assert await restarted.evaluate(customer) == 1  # decided again: the same id ...
    assert len(await fired(redis, customer)) == 1  # ... which publish_once tells once

    later = next_bucket(Window.MONTH, bucket_start(Window.MONTH, now)) + timedelta(hours=1)
    await feed.send(calls(customer, 13_000, later))  # next month: $3.00 again
    assert await watch.evaluate(customer, later) == 1
    values = [
        (a["data"]["period"]["start"], a["data"]["threshold"]["value"])
        for a in await fired(redis, customer)
    ]
    assert values[1] == (f"{later:%Y-%m}-01T00:00:00Z", "3")
    assert len(values) == 2


async def test_the_running_watch_fires_within_seconds_of_the_batch(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, payg: Account
) -> None:
    customer = payg.customer
    async with alerts_client(settings, pool, redis) as client:
        await add_rule(client, customer, ["0.50"])
    feed = Feed(redis, customer, METERS)
    publisher, watch = AlertPublisher(redis, lambda: METERS), SpendWatch(pool, redis)
    await watch.drain()  # the rule's own mark: nothing spent yet, nothing due after it
    tasks = [asyncio.create_task(publisher.run()), asyncio.create_task(watch.run())]
    try:
        started = datetime.now(UTC)
        await feed.send(calls(customer, 10_500, utcnow()))  # $0.50
        publisher.wake([customer])  # as the batch processor does after the batch
        while not await fired(redis, customer):
            assert datetime.now(UTC) - started < timedelta(seconds=5)
            await asyncio.sleep(0.02)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _RedisEatingCancellations(Redis):
    """A real client whose ``zpopmin`` answers normally when cancelled while it waits,
    as a library that swallows a cancellation does: the watch must still stop."""

    waiting: asyncio.Event  # set once the cancellation would land in the wait

    async def zpopmin(self, name: Any, count: int | None = None) -> Any:
        popped = await super().zpopmin(name, count)
        self.waiting.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.2)  # "waiting for the reply": a cancellation lands here
        return popped


async def test_the_watch_stops_on_one_cancellation_even_when_redis_swallows_it(
    settings: Settings, pool: AsyncConnectionPool
) -> None:
    """Once, in CI, a cancelled watch never ended and hung the run: each turn now ends
    the loop if its task is being cancelled, whatever a step swallowed."""
    eating = cast(_RedisEatingCancellations, _RedisEatingCancellations.from_url(settings.redis_url))
    try:
        eating.waiting = asyncio.Event()
        task = asyncio.create_task(SpendWatch(pool, eating).run())
        await eating.waiting.wait()  # inside zpopmin's wait, which eats the cancellation
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert done == {task} and task.cancelled()
    finally:
        await eating.aclose()


async def test_bad_whole_invoice_rules_name_the_field(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis
) -> None:
    async with running_api(settings) as api:
        free = await sign_up(api, plan="free")
    path = f"/v1/customers/{free.customer}/alerts"
    async with alerts_client(settings, pool, redis) as client:
        cases = [
            ({"kind": "percent", "thresholds": [80]}, "meter"),
            ({"kind": "usage", "thresholds": [80]}, "meter"),
            ({"kind": "spend", "thresholds": ["5"]}, "thresholds[0]"),  # free: $0 for ever
            ({"kind": "spend", "thresholds": []}, "thresholds"),
            ({"kind": "spend", "thresholds": ["-1"]}, "thresholds"),
        ]
        for body, field in cases:
            reply = await client.post(path, json=body, headers=SERVICE)
            assert reply.status_code == 422, (body, reply.text)
            assert field in reply.text, (body, reply.text)


async def test_a_customer_billed_in_a_zone_is_rated_over_its_local_month(
    settings: Settings, pool: AsyncConnectionPool, redis: Redis, payg: Account
) -> None:
    """15,000 calls ($5.00) in the last half hour of the previous New York month fire
    nothing, though the UTC month holds them; the same again in this local month does,
    for the local month."""
    customer, new_york = payg.customer, zone("America/New_York")
    month = quota_month(utcnow(), new_york)
    async with alerts_client(settings, pool, redis) as client:
        await add_rule(client, customer, ["5.00"])
    feed = Feed(redis, customer, METERS, tz=new_york)
    publisher = AlertPublisher(redis, lambda: METERS)
    watch = SpendWatch(pool, redis, await meter_cache(pool), lambda _: new_york)
    await feed.send(calls(customer, 15_000, month.start - timedelta(minutes=30)))
    await settle(publisher, watch, customer)
    assert await fired(redis, customer) == []
    await feed.send(calls(customer, 15_000, month.start + timedelta(minutes=30)))
    await settle(publisher, watch, customer)
    [alert] = await fired(redis, customer)
    assert alert["data"]["amount"] == "5.00"
    assert alert["data"]["period"]["start"] == month.start.isoformat().replace("+00:00", "Z")


async def meter_cache(pool: AsyncConnectionPool) -> MeterCache:
    """The catalog's meters as billing holds them (loaded once: nothing changes here)."""
    cache = MeterCache(pool, "", max_age=3600)
    await cache.refresh()
    return cache
