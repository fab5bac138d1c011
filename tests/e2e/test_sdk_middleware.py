"""The SDK's enforcement side against a real `tally up`: ``check``/``reserve`` decisions
and typed errors, and ``TallyMiddleware`` in front of the example geocoder app."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from tally_sdk import AuthenticationError, InvalidRequest, Tally

from examples.geocoder.app import create_app
from schemas import redis_keys
from services.common.broker import free_port
from services.common.settings import Settings
from tests.conftest import env_for
from tests.support import TallyProcess, wait_for

pytestmark = pytest.mark.slow
TOKEN = "test-token"  # the service token of the `module_settings` fixture
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def up(
    module_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TallyProcess]:
    log = tmp_path_factory.mktemp("up") / "up.log"
    process = TallyProcess(["up"], env_for(module_settings), log).start()
    yield process
    process.stop()


@pytest.fixture
async def tally(up: TallyProcess) -> AsyncIterator[Tally]:
    async with Tally(up.url, TOKEN, source=f"sdk-test-{uuid.uuid4().hex[:8]}") as client:
        yield client


def sign_up(url: str, tenant: str) -> dict[str, Any]:
    answer = httpx.post(
        f"{url}/v1/signup",
        json={"email": f"{tenant}@example.com", "company": tenant, "plan": "free"},
    )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


def geocoder(tally: Tally, fail_open: bool = False) -> httpx.AsyncClient:
    app = create_app(tally, fail_open=fail_open)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://geocoder")


async def test_check_and_reserve_answer_with_decisions_or_typed_errors(
    up: TallyProcess, tally: Tally, tenant: str
) -> None:
    account = sign_up(up.url, tenant)
    key, customer = account["api_key"]["key"], account["customer"]["id"]

    checked = await tally.check(key=key, endpoint="/v1/geocode")
    assert checked.allowed and checked.status == 200 and checked.problem is None
    assert (checked.customer, checked.plan) == (customer, "free")
    assert checked.remaining is not None and checked.reset is not None
    assert {"RateLimit", "RateLimit-Policy"} <= checked.headers.keys()
    assert "free-per-minute" in {limit["policy"] for limit in checked.limits}
    assert (await tally.check(customer=customer)).allowed  # the service token acts for it

    decisions = [await tally.reserve(f"r-{n}", key=key, endpoint="/v1/geocode") for n in range(11)]
    allowed = [d for d in decisions if d.allowed]
    refused = decisions[len(allowed)]  # the free plan's 10 a minute, spent in order
    assert 0 < len(allowed) <= 10 and allowed[-1].remaining == 0
    assert allowed[0].reservation is not None
    assert allowed[0].reservation["event"] == {"source": tally.source, "id": "r-0"}
    assert (refused.allowed, refused.status, refused.policy) == (False, 429, "free-per-minute")
    assert refused.retry_after is not None and refused.retry_after > 0
    assert refused.headers["Retry-After"] == str(refused.retry_after)
    assert refused.problem is not None
    assert refused.problem["type"] == "https://tally.dev/problems/rate-limited"

    with pytest.raises(AuthenticationError) as unknown:
        await tally.check(key="tally_live_" + "x" * 49)
    assert unknown.value.status == 401 and unknown.value.problem is not None
    with pytest.raises(InvalidRequest) as meter:
        await tally.check(key=key, meter="no_such_meter")
    assert meter.value.problem is not None
    assert meter.value.problem["errors"][0]["field"] == "body.meter"
    with pytest.raises(ValueError, match="key="):
        await tally.check()


async def test_middleware_limits_relays_refusals_and_meters(
    up: TallyProcess, tally: Tally, tenant: str, redis: Redis
) -> None:
    account = sign_up(up.url, tenant)
    key, customer = account["api_key"]["key"], account["customer"]["id"]
    async with geocoder(tally) as http:
        assert (await http.get("/healthz")).status_code == 200  # excluded: no key needed
        missing = await http.get("/v1/geocode", params={"q": "paris"})
        assert missing.status_code == 401 and missing.headers["content-type"] == PROBLEM
        unknown = await http.get("/v1/geocode", headers={"X-API-Key": "tally_live_nope"})
        assert unknown.status_code == 401 and unknown.json()["status"] == 401

        served = [
            await http.get("/v1/geocode", params={"q": q}, headers={"X-API-Key": key})
            for q in ("paris", "tokyo", "atlantis")
        ]
        served += [
            await http.post(
                "/v1/recognize",
                json={"url": f"https://img.example/{n}.png"},
                headers={"Authorization": f"Bearer {key}"},
            )
            for n in range(7)
        ]
        assert [r.status_code for r in served] == [200, 200, 404] + [200] * 7
        assert all("RateLimit" in r.headers and "RateLimit-Policy" in r.headers for r in served)
        assert served[0].json()["lat"] == 48.8566

        refused = await http.get("/v1/geocode", params={"q": "paris"}, headers={"X-API-Key": key})
        assert refused.status_code == 429 and refused.headers["content-type"] == PROBLEM
        assert int(refused.headers["Retry-After"]) > 0 and "RateLimit" in refused.headers
        assert refused.json()["policy"] == "free-per-minute"
        assert refused.json()["instance"] == "/v1/geocode"  # the caller's, not Tally's path

    await tally.flush()
    assert tally.stats.accepted == 10 and tally.stats.undelivered == 0

    def metered() -> dict[str, Decimal]:
        usage = httpx.get(
            f"{up.url}/v1/customers/{customer}/usage",
            params={"meter": "api_calls", "window": "hour", "group_by": "endpoint"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ).json()
        found: dict[str, Decimal] = {}
        for point in usage.get("data", []):
            endpoint = point["groups"]["endpoint"]
            found[endpoint] = found.get(endpoint, Decimal(0)) + Decimal(point["value"])
        return found

    wait_for(lambda: metered() == {"/v1/geocode": 3, "/v1/recognize": 7}, 30, "usage", up.tail)
    # Counting the events settled what was held for them (the calls were admitted from
    # leases, still open: the app was not shut down): nothing is held twice.
    open_ = await redis.hkeys(redis_keys.reservations(customer))
    assert all(str(field).removeprefix("b'").startswith("ls_") for field in open_)
    assert int(await redis.hget(redis_keys.held(customer), "api_calls") or 0) == 0


@pytest.mark.parametrize(("fail_open", "status"), [(False, 503), (True, 200)])
async def test_middleware_when_tally_is_unreachable(fail_open: bool, status: int) -> None:
    async with (
        Tally(f"http://127.0.0.1:{free_port()}", TOKEN, close_timeout=0.1) as tally,
        geocoder(tally, fail_open=fail_open) as http,
    ):
        answer = await http.get("/v1/geocode", params={"q": "paris"}, headers={"X-API-Key": "k"})
        assert answer.status_code == status
        if status == 503:
            assert answer.headers["content-type"] == PROBLEM and "Retry-After" in answer.headers
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/v1/geocode")).status_code == 401  # no key: never let through
    assert tally.stats.emitted == 0  # nothing to meter without a decision naming a customer
