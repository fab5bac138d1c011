"""Quotas over the customer's local calendar month, when it is billed in a time zone.

The accounts projection publishes the zone, every process holding zones follows it, the
enforcement and the limits status read the local month's counter and reset at local
midnight, and the aggregator's alerts fire on the local month's total.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.alerts import parse_crossing
from schemas.events import VALUE_SCALE, utcnow
from schemas.windows import Window, bucket_id
from schemas.zones import quota_month, zone
from services.aggregator.alerts import notification
from services.api.accounts import projection
from services.common.settings import Settings
from services.common.zone_book import ZoneBook
from tests.accounts_support import ADMIN, customer_on, plan_with, running_api
from tests.integration.test_alert_crossings import Feed, calls, set_levels, take_out
from tests.lease_support import catalog_meters

NEW_YORK = zone("America/New_York")
assert NEW_YORK is not None


async def _used(redis: Redis, customer: str, bucket: str, calls: int) -> None:
    key = redis_keys.counters(customer, "api_calls", Window.MONTH, bucket)
    await redis.hset(key, redis_keys.TOTAL, calls * VALUE_SCALE)
    await redis.expire(key, 3600)


async def test_a_hard_quota_counts_the_local_month_and_resets_at_local_midnight(
    settings: Settings, redis: Redis
) -> None:
    async with running_api(settings) as api:
        customer, key = await customer_on(api, plan_with(quota=10))
        path = f"/v1/admin/customers/{customer}"
        moved = await api.patch(path, json={"timezone": "America/New_York"}, headers=ADMIN)
        assert moved.status_code == 200, moved.text
        month = quota_month(utcnow(), NEW_YORK)
        await _used(redis, customer, month.bucket, 10)
        await _used(redis, customer, bucket_id(Window.MONTH, utcnow()), 0)

        refused = await api.post("/v1/enforce", json={}, headers=key)
        assert refused.status_code == 429, refused.text
        assert refused.json()["type"].endswith("/quota-exceeded")
        reset = int(refused.headers["Retry-After"])
        until_local_end = (month.end - utcnow()).total_seconds()
        assert abs(reset - until_local_end) < 5, (reset, until_local_end)

        leased = await api.post("/v1/leases", json={"meter": "api_calls", "want": 5}, headers=key)
        assert leased.status_code == 429, leased.text  # a lease counts the same month
        await _used(redis, customer, month.bucket, 7)
        leased = await api.post("/v1/leases", json={"meter": "api_calls", "want": 5}, headers=key)
        assert leased.status_code == 200 and 1 <= leased.json()["granted"] <= 3, leased.text
        await api.post("/v1/leases/return", json={"lease": leased.json()["lease"]}, headers=key)
        await _used(redis, customer, month.bucket, 10)

        status = await api.get(f"/v1/customers/{customer}/limits", headers=key)
        [quota] = [p for p in status.json()["limits"] if p.get("meter") == "api_calls"]
        assert Decimal(quota["used"]) == 10 and Decimal(quota["remaining"]) == 0
        assert abs(quota["reset"] - (month.end - utcnow()).total_seconds()) < 5, quota

        back = await api.patch(path, json={"timezone": "UTC"}, headers=ADMIN)
        assert back.status_code == 200, back.text  # the UTC month's counter: 0 used
        assert (await api.post("/v1/enforce", json={}, headers=key)).status_code == 200


async def test_zones_reach_every_process_and_survive_a_flush(
    settings: Settings, redis: Redis, pool: AsyncConnectionPool
) -> None:
    book = ZoneBook(redis, refresh_seconds=0.05)
    await book.start()
    try:
        async with running_api(settings) as api:
            customer, _ = await customer_on(api, plan_with(quota=10))
            assert book.zone(customer) is None
            path = f"/v1/admin/customers/{customer}"
            await api.patch(path, json={"timezone": "America/New_York"}, headers=ADMIN)
        await book.refresh()
        assert book.zone(customer) == NEW_YORK
        await redis.hdel(redis_keys.ZONES, customer)  # a flushed Redis, in part
        await redis.incr(redis_keys.ZONES_VERSION)
        await book.refresh()
        assert book.zone(customer) is None
        await projection.sync_zones(redis, pool)
        await book.refresh()
        assert book.zone(customer) == NEW_YORK
    finally:
        await book.stop()


async def test_alerts_fire_on_the_local_months_total(redis: Redis) -> None:
    """Two calls in the last hour of the previous local month and two in this one: the
    UTC month holds four, but no local month reaches the threshold of three until a
    fifth call; the alert then names the local month."""
    customer = f"z{uuid.uuid4().hex[:10]}"
    await set_levels(redis, customer, [3])
    month = quota_month(utcnow(), NEW_YORK)
    before, after = month.start - timedelta(minutes=30), month.start + timedelta(minutes=30)
    feed = Feed(redis, customer, catalog_meters(), tz=NEW_YORK)
    await feed.send(calls(customer, 2, before) + calls(customer, 2, after))
    assert await take_out(redis, customer) == []
    await feed.send(calls(customer, 1, after))
    [raw] = await take_out(redis, customer)
    meter, label, *_ = raw.split(" ")
    assert (meter, label) == ("api_calls", month.bucket)
    told = notification(customer, parse_crossing(raw), None)
    period = told.data["period"]
    assert period["start"] == month.start.isoformat().replace("+00:00", "Z"), period
