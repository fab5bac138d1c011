"""Meters as live data over the admin API: create, change, archive, history — and every
process sees a change without a restart."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas import redis_keys
from schemas.events import utcnow
from schemas.windows import Window
from services.aggregator.increments import CounterOps
from services.aggregator.redis_sink import Apply, Outcome, RedisSink
from services.common.meter_cache import MeterCache
from services.common.settings import Settings
from tests.accounts_support import ADMIN, plan_with, put_plan, running_api


def llm_meter(**changes: Any) -> dict[str, Any]:
    body = {
        "name": f"llm_in_{uuid.uuid4().hex[:8]}",
        "description": "Input tokens of LLM calls",
        "event_type": "llm_call",
        "aggregation": "sum",
        "value_property": "$.tokens.input",
        "group_by": ["$.model"],
        "filters": {"$.region": {"in": ["eu", "uk"]}},
        "unit": "tokens",
    }
    return body | changes


def problem(reply: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = reply.json()
    assert body["type"] == f"https://tally.dev/problems/{kind}", body
    return body


async def test_a_meter_is_created_read_changed_and_archived_with_its_history(
    settings: Settings,
) -> None:
    async with running_api(settings) as client:
        meter = llm_meter()
        name = meter["name"]
        created = await client.post("/v1/admin/meters", json=meter, headers=ADMIN)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["version"] == 1 and not body["archived"] and body["counting_from"] > 0
        assert body["filters"] == {"$.region": {"in": ["eu", "uk"]}}
        listed = (await client.get("/v1/admin/meters", headers=ADMIN)).json()["meters"]
        assert name in {m["name"] for m in listed}

        renamed = meter | {"description": "Prompt tokens", "group_by": ["$.model", "region"]}
        changed = await client.put(f"/v1/admin/meters/{name}", json=renamed, headers=ADMIN)
        assert changed.status_code == 200, changed.text
        assert changed.json()["version"] == 2
        assert changed.json()["counting_from"] == body["counting_from"]  # counts as before

        recount = meter | {"aggregation": "max"}  # nothing counted yet: allowed, recounts
        again = await client.put(f"/v1/admin/meters/{name}", json=recount, headers=ADMIN)
        assert again.status_code == 200 and again.json()["counting_from"] > body["counting_from"]

        archived = await client.delete(f"/v1/admin/meters/{name}", headers=ADMIN)
        assert archived.status_code == 200 and archived.json()["archived"]
        history = (await client.get(f"/v1/admin/meters/{name}/versions", headers=ADMIN)).json()
        versions = history["versions"]
        assert [v["version"] for v in versions] == [1, 2, 3, 4]
        assert versions[1]["definition"]["description"] == "Prompt tokens"
        assert versions[3]["definition"]["archived"] and versions[0]["changed_by"] == "admin"
        listed = (await client.get("/v1/admin/meters", headers=ADMIN)).json()["meters"]
        assert [m["archived"] for m in listed if m["name"] == name] == [True]
        again = await client.put(f"/v1/admin/meters/{name}", json=meter, headers=ADMIN)
        problem(again, 409, "meter-exists")


def counting_five(customer: str, meter: str, month: str) -> tuple[str, CounterOps]:
    """The counter operations that count 5 for ``customer`` on ``meter`` in ``month``."""
    key = redis_keys.counters(customer, meter, Window.MONTH, month)
    ops = CounterOps()
    ops.sums[(key, redis_keys.TOTAL)] = 5_000_000
    ops.expiry[key] = int(utcnow().timestamp()) + 600
    ops.months[key] = (meter, month)
    return key, ops


async def test_a_meter_that_counted_cannot_change_how_it_counts(
    settings: Settings, redis: Redis
) -> None:
    async with running_api(settings) as client:
        meter = llm_meter()
        name = meter["name"]
        assert (await client.post("/v1/admin/meters", json=meter, headers=ADMIN)).is_success
        customer = f"{name}-customer"  # a customer of its own: offsets start afresh
        key, ops = counting_five(customer, name, "202612")
        fresh = {"value_property": "$.tokens.output"}
        moved = await client.put(f"/v1/admin/meters/{name}", json=meter | fresh, headers=ADMIN)
        assert moved.status_code == 200, moved.text  # nothing counted yet: it may change
        share = Apply(customer, "t/0", None, 1, [redis_keys.seen(customer, "x")], 0, [], ops)
        assert [r.outcome for r in await RedisSink(redis).apply([share])] == [Outcome.APPLIED]
        try:
            changes: list[dict[str, Any]] = [
                {"value_property": "$.tokens.input"},
                {"filters": {}},
                {"aggregation": "min"},
                {"event_type": "llm_call_v2"},
            ]
            for change in changes:
                reply = await client.put(
                    f"/v1/admin/meters/{name}", json=meter | fresh | change, headers=ADMIN
                )
                detail = problem(reply, 409, "meter-definition-locked")["detail"]
                assert next(iter(change)) in detail and "new meter" in detail
            fine = await client.put(
                f"/v1/admin/meters/{name}", json=meter | fresh | {"unit": "tok"}, headers=ADMIN
            )
            assert fine.status_code == 200, fine.text
        finally:
            await redis.delete(key)


async def test_a_meter_a_plan_uses_is_not_archived(settings: Settings) -> None:
    async with running_api(settings) as client:
        meter = llm_meter()
        name = meter["name"]
        assert (await client.post("/v1/admin/meters", json=meter, headers=ADMIN)).is_success
        plan = plan_with(
            prices={name: {"model": "per_unit", "unit_price": "0.000002"}},
            quotas={name: {"limit": 1000000}},
        )
        await put_plan(client, plan)
        refused = await client.delete(f"/v1/admin/meters/{name}", headers=ADMIN)
        assert plan["id"] in problem(refused, 409, "meter-in-use")["detail"]


@pytest.mark.parametrize(
    ("body", "field", "why"),
    [
        ({"value_property": "$.tokens..input"}, "body.value_property", "is not a path"),
        ({"value_property": "$"}, "body.value_property", "whole data object"),
        ({"group_by": ["$.model", "model"]}, "body", "group_by lists a dimension twice"),
        ({"filters": {"$.region": {"in": []}}}, "body.filters.$.region.in", "at least 1"),
        ({"filters": {"$.region": {"equals": "eu", "prefix": "e"}}}, "body.filters.$.region", ""),
        ({"aggregation": "median"}, "body.aggregation", ""),
        ({"aggregation": "count"}, "body", "value_property must stay"),
        ({"name": "Bad-Name"}, "body.name", ""),
        ({"colour": "blue"}, "body.colour", ""),
    ],
)
async def test_bad_meters_are_refused_naming_the_field(
    settings: Settings, body: dict[str, Any], field: str, why: str
) -> None:
    async with running_api(settings) as client:
        reply = await client.post("/v1/admin/meters", json=llm_meter(**body), headers=ADMIN)
        problem_body = problem(reply, 422, "invalid-request")
        assert any(e["field"] == field and why in e["reason"] for e in problem_body["errors"]), (
            problem_body
        )


async def test_unknown_meters_and_other_callers(settings: Settings) -> None:
    async with running_api(settings) as client:
        problem(await client.get("/v1/admin/meters/no_such", headers=ADMIN), 404, "unknown-meter")
        problem(
            await client.get("/v1/admin/meters/no_such/versions", headers=ADMIN),
            404,
            "unknown-meter",
        )
        problem(await client.get("/v1/admin/meters"), 401, "unauthorized")
        meter = llm_meter()
        wrong = await client.put("/v1/admin/meters/other_name", json=meter, headers=ADMIN)
        assert wrong.status_code == 422 and "body.name" in wrong.text
        assert (await client.post("/v1/admin/meters", json=meter, headers=ADMIN)).is_success
        again = await client.post("/v1/admin/meters", json=meter, headers=ADMIN)
        problem(again, 409, "meter-exists")


async def test_another_process_counts_a_new_meter_without_a_restart(
    settings: Settings, pool: AsyncConnectionPool
) -> None:
    other = MeterCache(pool, settings.database_url, max_age=60)
    await other.start()
    try:
        async with running_api(settings) as client:
            meter = llm_meter()
            before = other.current()
            assert before is not None
            reply = await client.post("/v1/admin/meters", json=meter, headers=ADMIN)
            counting_from = reply.json()["counting_from"]
            for _ in range(100):  # notified within milliseconds; 5 s at most
                index = other.current()
                if index is not None and meter["name"] in index.by_name:
                    break
                await asyncio.sleep(0.05)
            index = other.current()
            assert index is not None and meter["name"] in index.by_name
            assert index.version >= counting_from > before.version
            assert index.counting_from[meter["name"]] == counting_from
            assert index.by_name[meter["name"]].filters["$.region"].in_ == ("eu", "uk")
    finally:
        await other.stop()


async def test_an_archived_meter_counts_no_more_but_its_history_is_read(
    settings: Settings, redis: Redis
) -> None:
    async with running_api(settings) as client:
        meter = llm_meter()
        name = meter["name"]
        assert (await client.post("/v1/admin/meters", json=meter, headers=ADMIN)).is_success
        customer = f"{name}-customer"
        key, ops = counting_five(customer, name, utcnow().strftime("%Y%m"))
        share = Apply(customer, "t/0", None, 1, [redis_keys.seen(customer, "y")], 0, [], ops)
        assert [r.outcome for r in await RedisSink(redis).apply([share])] == [Outcome.APPLIED]
        try:
            archived = await client.delete(f"/v1/admin/meters/{name}", headers=ADMIN)
            assert archived.status_code == 200, archived.text
            read = await client.get(
                f"/v1/customers/{customer}/usage",
                params={"meter": name, "window": "month"},
                headers={"Authorization": "Bearer test-token"},
            )
            assert read.status_code == 200, read.text
            assert read.json()["data"][-1]["value"] == "5"  # this month
            unknown = await client.get(
                f"/v1/customers/{customer}/usage",
                params={"meter": name + "x", "window": "month"},
                headers={"Authorization": "Bearer test-token"},
            )
            assert unknown.status_code == 422 and name in unknown.json()["detail"]
        finally:
            await redis.delete(key)
