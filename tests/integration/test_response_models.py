"""Every route declares its response: the OpenAPI document `tally up` serves gives each
operation's success body a schema and its problems the problem+json one, and what the
hand-built answers (ingest's 202, the enforcement hot paths) send is what they document."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from schemas.events import utcnow
from services.api import service as api_service
from services.api.enforcement.routes import EnforceBatchResults, EnforceDecision
from services.billing.invoicing import routes as invoice_routes
from services.billing.notification.notifier import notifier
from services.billing.revenue import pages as revenue_pages
from services.billing.revenue import routes as revenue_routes
from services.billing.stripe import routes as stripe_routes
from services.billing.stripe.sessions import Sessions
from services.billing.stripe.webhooks import Webhooks
from services.common.problems import PROBLEM_JSON
from services.common.settings import Settings
from services.ingest.app import Ingest, IngestReceipt, openapi_schemas
from services.ingest.app import router as ingest_router
from services.ingest.publisher import Publisher
from services.runtime import Component, Runtime, http_app
from tests.accounts_support import random_address, sign_up
from tests.support import sample_event

METHODS = {"get", "put", "post", "patch", "delete"}
UNDOCUMENTED = {"/metrics"}  # Prometheus text, not part of the API
NO_PROBLEMS = {"/healthz", "/readyz"}  # /readyz's 503 is its own report, not a problem


class KeptEvents(Publisher):
    """Kafka stand-in: the ingest route's own answer is what is under test here."""

    def __init__(self) -> None:
        super().__init__(producer=None)

    async def publish(self, events: Any, received_at: datetime, catalog_version: int = 0) -> None:
        pass

    async def dead_letter(self, *args: Any) -> None:
        pass


@pytest.fixture
async def tally(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """One process with every service's routes, as `tally up` wires them (the billing
    service without its scheduled jobs, ingest without Kafka)."""
    async with Runtime(settings) as runtime:
        pool, auth = await runtime.pool(), await runtime.authenticator()
        ingest = Ingest(settings, KeptEvents(), auth)
        hooks = Webhooks(pool, runtime.redis(), "whsec_test", "free")
        components = [
            Component("aggregator"),
            Component(
                "billing",
                routers=[
                    invoice_routes.router(pool, auth, runtime.clickhouse),
                    stripe_routes.router(auth, Sessions(pool, None), hooks),
                    *notifier(settings, pool, runtime.redis(), auth).routers,
                    revenue_routes.router(pool, runtime.redis(), auth),
                    revenue_pages.router(settings, pool, runtime.redis(), auth),
                ],
            ),
            Component("ingest", [ingest_router(ingest)], schemas=openapi_schemas()),
            await api_service.start(runtime),
        ]
        served = http_app(components)
        app = getattr(served, "app", served)
        assert isinstance(app, FastAPI)
        transport = httpx.ASGITransport(served, client=(random_address(), 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        assert name in spec["components"]["schemas"], f"{schema['$ref']} is not a component"
        return _resolve(spec, spec["components"]["schemas"][name])
    return schema


async def test_every_operation_documents_its_success_and_its_problems(tally) -> None:
    app, client = tally
    spec = (await client.get("/openapi.json")).json()
    operations = [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS and path not in UNDOCUMENTED
    ]
    assert len(operations) >= 29
    assert {"/v1/events", "/v1/enforce", "/v1/stripe/webhook", "/healthz"} <= set(spec["paths"])
    for path, method, operation in operations:
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        ok = sorted(code for code in responses if re.fullmatch(r"2\d\d", code))
        assert ok, f"{where} documents no success"
        for code in ok:
            if code == "204":
                assert "content" not in responses[code], where
                continue
            schema = responses[code]["content"]["application/json"]["schema"]
            assert "$ref" in schema or {"properties", "items"} & set(schema), (where, schema)
            body = _resolve(spec, schema)
            assert "properties" in body or "items" in body, (where, code, body)
        problems = {
            code: response
            for code, response in responses.items()
            if re.fullmatch(r"[45]\d\d", code) and path not in NO_PROBLEMS
        }
        if path not in NO_PROBLEMS:
            assert problems, f"{where} declares none of its problem+json answers"
        for code, response in problems.items():
            assert set(response["content"]) == {PROBLEM_JSON}, (where, code)
            problem = response["content"][PROBLEM_JSON]["schema"]
            assert problem == {"$ref": "#/components/schemas/ProblemDetails"}, (where, code)
    assert "HTTPValidationError" not in str(spec["paths"])  # every 422 is problem+json
    referenced = set(re.findall(r"#/components/schemas/([\w-]+)", str(spec)))
    assert referenced <= set(spec["components"]["schemas"])
    clashes = [name for name in spec["components"]["schemas"] if "__" in name]
    assert not clashes, f"two models share a name, so FastAPI spells out modules: {clashes}"

    for route in app.routes:
        if not isinstance(route, APIRoute) or route.path in UNDOCUMENTED:
            continue
        html = isinstance(route.response_class, type) and issubclass(
            route.response_class, HTMLResponse
        )
        if html:  # the pages
            continue
        assert route.response_model is not None or route.status_code == 204, route.path


def _documented(model: type[BaseModel], body: Any) -> None:
    """``body`` is exactly what ``model`` describes: every member it has, no other."""
    assert model.model_validate(body).model_dump(mode="json", exclude_unset=True) == body


async def test_hand_built_answers_are_what_they_document(tally) -> None:
    _, client = tally
    account = await sign_up(client, plan="pro")
    event = sample_event(id=uuid.uuid4().hex, subject=account.customer, time=utcnow().isoformat())
    ingested = await client.post(
        "/v1/events",
        json=[event, event, {**event, "id": "", "specversion": "0.3"}],
        headers=account.auth | {"Content-Type": "application/cloudevents-batch+json"},
    )
    assert ingested.status_code == 202, ingested.text
    _documented(IngestReceipt, ingested.json())
    assert {r["status"] for r in ingested.json()["results"]} == {
        "accepted",
        "duplicate",
        "rejected",
    }

    reserve = {
        "mode": "reserve",
        "event": {"source": "response-models", "id": uuid.uuid4().hex},
    }
    decided = await client.post("/v1/enforce", json=reserve, headers=account.auth)
    assert decided.status_code == 200, decided.text
    _documented(EnforceDecision, decided.json())
    assert decided.json()["reservation"] is not None

    checks = [{"meter": "api_calls"}, {"meter": "no_such_meter"}, {"quantity": "-1"}]
    batch = await client.post("/v1/enforce/batch", json={"checks": checks}, headers=account.auth)
    assert batch.status_code == 200, batch.text
    assert [r["status"] for r in batch.json()["results"]] == [200, 422, 422]
    _documented(EnforceBatchResults, batch.json())
