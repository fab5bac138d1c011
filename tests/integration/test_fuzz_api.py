"""Schemathesis over the whole OpenAPI document `tally up` serves: every operation of
ingest, the API and billing, with the service token and the admin token, answers within
its documented statuses, content types, bodies and headers, and never a 5xx.

The services are started as `tally up` starts them (``services.<name>.service.start``)
against a PostgreSQL database of its own, Redis, Kafka (Tansu), chDB and the fake Stripe; only
the aggregator's Faust worker is left out, as it serves no route.  Requests reach the
application in-process over ASGI: schemathesis runs every call on one event loop thread
of its own, so the services are started on that loop, by the application's lifespan.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.pytest.lazy import get_all_tests
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from schemas.text import CONTROL_CHARACTERS
from services.api import service as api_service
from services.billing import service as billing_service
from services.common import clickhouse
from services.common.settings import DEV_ADMIN_TOKEN, Settings
from services.ingest import service as ingest_service
from services.runtime import Component, Runtime, http_app
from tests.conftest import PARTITIONS, REDIS_URL, fresh_database
from tests.fake_stripe import FakeStripe

# schemathesis' own strategies draw from `random` (its business, not a flaw of the API)
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SERVICE_TOKEN = "test-token"
HTTP_METHODS = {"get", "put", "post", "patch", "delete", "head", "options", "trace"}


def allow_names_the_documented_methods(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 405's ``Allow`` lists every method the path documents, and no other (HEAD
    goes with GET); schemathesis' own check only wants the header present."""
    if response.status_code != 405:
        return None
    [allow] = response.headers.get("allow", [""])
    allowed = {m.strip().lower() for m in allow.split(",") if m.strip()}
    item = case.operation.schema.raw_schema["paths"][case.operation.path]
    documented = {m for m in item if m in HTTP_METHODS}
    if documented <= allowed and allowed - documented <= {"head"}:
        return True
    raise AssertionError(f"405 with Allow: {allow!r}; the path documents {sorted(documented)}")


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    unsupported_method,
    allow_names_the_documented_methods,
]
# Random cases per operation, after schemathesis' examples and coverage phase (which
# make most of the requests), with the token each route takes; and with the other
# token or a customer's key, whose answers are mostly refusals.
EXAMPLES = 10
REFUSED_EXAMPLES = 3


class Tally:
    """`tally up`'s HTTP application, its services started by the ASGI lifespan (so on
    the event loop that will serve the requests) once for the module.

    schemathesis' pytest plugin ends every application's lifespan when a test ends
    and starts it again on the next call; the services outlive those ends, and stop in
    reverse order on the lifespan end that follows ``stopping``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: Any = None
        self.stack = AsyncExitStack()
        self.stopping = False

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.app is None:
                    await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.stopping:
                    await self.stack.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        runtime = await self.stack.enter_async_context(Runtime(self.settings))
        await asyncio.to_thread(clickhouse.create_schema, runtime.clickhouse())
        components = [
            Component(
                "aggregator",  # its Faust worker serves no route; its readiness checks
                checks={
                    "redis": runtime.check_redis(),
                    "clickhouse": runtime.check_clickhouse(),
                    "postgres": runtime.check_postgres(),
                },
            ),
            await ingest_service.start(runtime),
            await api_service.start(runtime),
            await billing_service.start(runtime),
        ]
        self.app = http_app(components)


@pytest.fixture(scope="module")
def fuzz_database() -> Iterator[str]:
    """A database of its own: the fuzzing creates customers and keys and rewrites plans
    at random, which the other modules of the session must not see."""
    with fresh_database("tally_fuzz") as url:
        yield url


@pytest.fixture(scope="module")
def tally_settings(
    tmp_path_factory: pytest.TempPathFactory,
    fuzz_database: str,
    kafka_bootstrap: str,
    fake_stripe: FakeStripe,
) -> Settings:
    return Settings(
        database_url=fuzz_database,
        redis_url=REDIS_URL,
        kafka_bootstrap_servers=kafka_bootstrap,
        data_dir=tmp_path_factory.mktemp("fuzz") / "data",
        events_partitions=PARTITIONS,
        service_tokens=[SERVICE_TOKEN],
        admin_token=DEV_ADMIN_TOKEN,
        stripe_api_key="sk_test_fuzz",
        stripe_api_base=fake_stripe.api_base,
        stripe_webhook_secret="whsec_fuzz",
        # every generated request comes from one address: let it guess credentials
        ip_auth_failures_per_minute=1_000_000,
    )


@pytest.fixture(scope="module")
def api_schema(tally_settings: Settings) -> Iterator[Any]:
    tally = Tally(tally_settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", tally)
    yield schema
    tally.stopping = True
    with schemathesis_asgi.get_client(tally):  # a lifespan to end, if a test ended it
        pass
    schemathesis_asgi.shutdown_lifespans()


@pytest.fixture
def client(api_schema: Any) -> Iterator[Any]:
    """A client of the running services: schemathesis' ASGI client, on their loop."""
    with schemathesis_asgi.get_client(api_schema.app) as session:
        yield session


ADMIN = "^/v1/admin/"  # the admin API takes the admin token; every other route, not


def fuzz(schema: Any, token: str, examples: int, coverage: bool) -> dict[str, set[int]]:
    """Every operation's generated cases (schemathesis' examples, its coverage phase
    when ``coverage``: boundaries, missing fields, methods the path does not serve;
    then ``examples`` random ones), each answer checked; all failures reported
    together, by operation.  Returns the statuses each operation answered.

    (schemathesis' own pytest loader renames pytest's nodes through an attribute
    pytest 9 no longer has, so its per-operation tests are run here by hand.)"""
    answered: dict[str, set[int]] = {}

    def call(case: Any) -> None:
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        answered.setdefault(case.operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    bounds = hypothesis_settings(
        max_examples=examples,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report, don't minimise
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same cases on every run
    )
    phases = schema.config.phases
    was, phases.coverage.enabled = phases.coverage.enabled, coverage
    failures: dict[str, str] = {}
    try:
        for result in get_all_tests(
            schema=schema, test_func=call, settings=bounds, given_kwargs={}
        ):
            if not isinstance(result, Ok):  # an operation schemathesis cannot build cases for
                failures[str(result.err())] = "invalid schema"
                continue
            operation, test = result.ok()
            try:
                test()
            except (Exception, BaseExceptionGroup) as exc:
                failures[operation.label] = _explain(exc)
    finally:
        phases.coverage.enabled = was
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    return answered


def _explain(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_explain(e) for e in exc.exceptions) + f" ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _succeeded(answered: dict[str, set[int]]) -> set[str]:
    return {op for op, statuses in answered.items() if any(s < 300 for s in statuses)}


def test_every_route_with_the_token_it_takes(api_schema: Any) -> None:
    """The admin API with the admin token, the rest with the service token: every
    phase, so the cases get past authentication to validation and the stores."""
    admin = fuzz(api_schema.include(path_regex=ADMIN), DEV_ADMIN_TOKEN, EXAMPLES, True)
    service = fuzz(api_schema.exclude(path_regex=ADMIN), SERVICE_TOKEN, EXAMPLES, True)
    assert set(admin) | set(service) == _operations(api_schema)  # every one was called
    # not only refused at the door: most operations answered a success at least once
    succeeded = _succeeded(admin | service)
    assert len(succeeded) >= 20, sorted(succeeded)


def test_every_route_with_the_other_token(api_schema: Any) -> None:
    """Refusals are documented too: each route with the token it does not take."""
    admin = fuzz(api_schema.exclude(path_regex=ADMIN), DEV_ADMIN_TOKEN, REFUSED_EXAMPLES, False)
    service = fuzz(api_schema.include(path_regex=ADMIN), SERVICE_TOKEN, REFUSED_EXAMPLES, False)
    assert any(401 in statuses for statuses in admin.values())
    assert all(401 in statuses for statuses in service.values()), service


def test_every_route_with_a_customer_key(api_schema: Any, client: Any) -> None:
    """A customer's own key: its own reads and keys answer, another customer's are 403."""
    admin = {"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"}
    email = f"{uuid.uuid4().hex[:12]}@example.com"  # the fuzzing may have taken any other
    opened = client.post("/v1/admin/customers", json={"email": email}, headers=admin)
    assert opened.status_code == 201, opened.text
    key = opened.json()["api_key"]["key"]
    answered = fuzz(api_schema.exclude(path_regex=ADMIN), key, REFUSED_EXAMPLES, False)
    assert {"GET /v1/keys", "GET /v1/meters"} <= _succeeded(answered), answered
    assert any(403 in statuses for statuses in answered.values()), answered


def _operations(schema: Any) -> set[str]:
    methods = {"get", "put", "post", "patch", "delete"}
    paths = schema.raw_schema["paths"].items()
    return {f"{m.upper()} {path}" for path, item in paths for m in item if m in methods}


CONTROLS = ["\x00", "\x1b", "\x7f", "\x9b"]


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_control_characters_in_paths_are_refused_by_name(
    api_schema: Any, client: Any, control: str
) -> None:
    """Every path parameter of every operation, given an id holding a control character,
    is refused with 422 naming that parameter (with the token the route takes), and no
    credential meets a 5xx (PostgreSQL refuses a NUL in text: it must not get one)."""
    spec = api_schema.raw_schema
    refused: list[str] = []
    for path, item in spec["paths"].items():
        names = re.findall(r"{(\w+)}", path)
        for method in {"get", "put", "post", "patch", "delete"} & set(item):
            for name in names:
                url = path
                for other in names:
                    url = url.replace(f"{{{other}}}", f"a{control}b" if other == name else "c1")
                answers = [
                    client.request(
                        method.upper(),
                        quote(url),
                        headers={"Authorization": f"Bearer {t}"},
                        json={},
                    )
                    for t in (SERVICE_TOKEN, DEV_ADMIN_TOKEN)
                ]
                where = f"{method.upper()} {path} ({name})"
                assert all(a.status_code < 500 for a in answers), (where, [a.text for a in answers])
                named = [
                    a
                    for a in answers
                    if a.status_code == 422
                    and any(
                        e["field"] == f"path.{name}" and "control characters" in e["reason"]
                        for e in a.json().get("errors", [])
                    )
                ]
                if not named:
                    refused.append(f"{where}: {[(a.status_code, a.text[:200]) for a in answers]}")
    assert not refused, "\n".join(refused)


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(
    ("path", "token", "body", "field"),
    [
        ("/v1/admin/customers", DEV_ADMIN_TOKEN, {"email": "a@example.com", "id": "c{}"}, "id"),
        (
            "/v1/admin/customers",
            DEV_ADMIN_TOKEN,
            {"email": "a@example.com", "company": "{}"},
            "company",
        ),
        ("/v1/enforce", SERVICE_TOKEN, {"customer": "c{}"}, "customer"),
        ("/v1/enforce", SERVICE_TOKEN, {"customer": "c1", "endpoint": "/x{}"}, "endpoint"),
    ],
)
def test_control_characters_in_bodies_are_refused_by_name(
    client: Any, control: str, path: str, token: str, body: dict[str, str], field: str
) -> None:
    sent = {k: v.replace("{}", control) for k, v in body.items()}
    answer = client.post(path, json=sent, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["errors"]
    assert error["field"] == f"body.{field}", error
    assert (
        f"must not contain control characters ({CONTROL_CHARACTERS}); found U+{ord(control):04X}"
        in error["reason"]
    )
