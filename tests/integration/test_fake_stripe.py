"""The fake Stripe server, driven by the real ``stripe`` SDK.

These tests pin the behaviour Tally's billing code will rely on, so that a test passing
against the fake means the same calls would work against Stripe: wire encoding, Stripe's
object shapes, idempotency, the SDK's retry rules and the meter event windows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
import stripe
from stripe._http_client import HTTPClient

from tests.fake_stripe import FakeStripe, decode_form, sign_webhook, webhook_event

DAY = 86400


class Clock:
    """A hand-moved clock, so windows of 24 hours or 35 days take no time."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeStripe]:
    with FakeStripe(clock=clock) as server:
        yield server


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    """Spelled out rather than ``fake.client()``: this is how Tally points the SDK."""
    return stripe.StripeClient(
        "sk_test_tally",
        base_addresses={"api": fake.api_base, "meter_events": fake.meter_events_base},
        max_network_retries=2,
    )


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK sleeps at least 0.5 s before a retry; the tests need not."""
    monkeypatch.setattr(HTTPClient, "INITIAL_DELAY", 0.01)
    monkeypatch.setattr(HTTPClient, "MAX_DELAY", 0.02)


def make_meter(client: stripe.StripeClient, event_name: str = "api_calls") -> str:
    meter = client.v1.billing.meters.create(
        {
            "display_name": "API calls",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    return meter.id


def make_customer(client: stripe.StripeClient) -> str:
    return client.v1.customers.create({"email": "ops@example.com"}).id


def send_event(
    client: stripe.StripeClient,
    customer: str,
    *,
    identifier: str,
    timestamp: int,
    value: str = "1",
    options: stripe.RequestOptions | None = None,
) -> stripe.billing.MeterEvent:
    return client.v1.billing.meter_events.create(
        {
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": customer, "value": value},
            "identifier": identifier,
            "timestamp": timestamp,
        },
        options,
    )


# -- wire format ---------------------------------------------------------------------------


def test_form_keys_decode_into_nested_dicts_and_lists() -> None:
    params = decode_form(
        [
            ("tiers[0][up_to]", "1000"),
            ("tiers[1][up_to]", "inf"),
            ("lookup_keys[]", "a"),
            ("lookup_keys[]", "b"),
            ("metadata[7]", "kept as a map key"),
            ("recurring[interval]", "month"),
        ]
    )
    assert params == {
        "tiers": [{"up_to": "1000"}, {"up_to": "inf"}],
        "lookup_keys": ["a", "b"],
        "metadata": {"7": "kept as a map key"},
        "recurring": {"interval": "month"},
    }


# -- catalog objects -----------------------------------------------------------------------


def test_customers_and_products(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create(
        {"email": "ops@example.com", "name": "Acme", "metadata": {"tally_account": "acc_1"}}
    )
    assert customer.id.startswith("cus_")
    assert (customer.object, customer.livemode) == ("customer", False)
    fetched = client.v1.customers.retrieve(customer.id)
    assert fetched.metadata is not None
    assert fetched.metadata["tally_account"] == "acc_1"

    product = client.v1.products.create({"id": "tally_api", "name": "API", "metadata": {"a": "1"}})
    assert (product.id, product.object) == ("tally_api", "product")
    client.v1.products.update("tally_api", {"name": "API v2", "metadata": {"a": "", "b": "2"}})
    product = client.v1.products.retrieve("tally_api")
    assert product.name == "API v2"
    assert product.metadata.to_dict() == {"b": "2"}

    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.customers.retrieve("cus_missing")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")

    sent = fake.requests_to("/v1/customers", "POST")[0]
    assert sent.params["metadata"] == {"tally_account": "acc_1"}
    assert sent.headers["authorization"] == "Bearer sk_test_tally"
    assert sent.headers["idempotency-key"]


def test_tiered_metered_prices_and_lookup_keys(client: stripe.StripeClient) -> None:
    meter = make_meter(client)
    product = client.v1.products.create({"name": "API"}).id
    params: stripe.params.PriceCreateParams = {
        "product": product,
        "currency": "usd",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
        "billing_scheme": "tiered",
        "tiers_mode": "graduated",
        "tiers": [
            {"up_to": 1000, "unit_amount_decimal": Decimal("0.5")},
            {
                "up_to": "inf",
                "unit_amount_decimal": Decimal("0.25"),
                "flat_amount_decimal": Decimal(100),
            },
        ],
        "lookup_key": "calls_monthly",
        "nickname": "Calls",
        "metadata": {"plan": "pro"},
    }
    price = client.v1.prices.create(params)
    assert price.id.startswith("price_")
    assert (price.billing_scheme, price.tiers_mode, price.type) == (
        "tiered",
        "graduated",
        "recurring",
    )
    assert price.recurring is not None and price.recurring.meter == meter
    assert "tiers" not in price  # like Stripe, tiers come only when expanded

    listed = client.v1.prices.list({"lookup_keys": ["calls_monthly"], "expand": ["data.tiers"]})
    assert [p.id for p in listed.data] == [price.id]
    assert listed.has_more is False
    tiers = listed.data[0].tiers
    assert tiers is not None
    assert [(t.up_to, t.unit_amount_decimal, t.flat_amount) for t in tiers] == [
        (1000, Decimal("0.5"), None),  # the SDK turns decimal strings into Decimals
        (None, Decimal("0.25"), 100),
    ]

    with pytest.raises(stripe.InvalidRequestError, match="already uses that lookup key"):
        client.v1.prices.create(params)
    volume = client.v1.prices.create(
        {**params, "tiers_mode": "volume", "transfer_lookup_key": True}
    )
    assert client.v1.prices.list({"lookup_keys": ["calls_monthly"]}).data[0].id == volume.id

    client.v1.prices.update(price.id, {"active": False})
    assert client.v1.prices.retrieve(price.id).active is False

    with pytest.raises(stripe.InvalidRequestError) as bad:
        client.v1.prices.create({**params, "lookup_key": "x", "tiers": [{"up_to": 5}]})
    assert bad.value.param == "tiers[0][unit_amount_decimal]"


# -- meters and meter events -----------------------------------------------------------------


def test_meters_and_meter_events(fake: FakeStripe, client: stripe.StripeClient) -> None:
    meter = make_meter(client)
    assert meter.startswith("mtr_")
    meters = client.v1.billing.meters.list()
    assert [m.event_name for m in meters.data] == ["api_calls"]
    customer = make_customer(client)
    now = int(fake.clock())

    event = send_event(client, customer, identifier="req_1", timestamp=now, value="25")
    assert (event.object, event.identifier, event.timestamp) == (
        "billing.meter_event",
        "req_1",
        now,
    )
    send_event(client, customer, identifier="req_2", timestamp=now - 34 * DAY, value="5")

    assert [e.identifier for e in fake.meter_events] == ["req_1", "req_2"]
    assert fake.meter_total("api_calls", customer) == Decimal(30)
    assert fake.meter_event_errors == []

    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.billing.meter_events.create(
            {"event_name": "nope", "payload": {"stripe_customer_id": customer, "value": "1"}}
        )
    assert unknown.value.code == "no_meter"
    with pytest.raises(stripe.InvalidRequestError) as fractional:
        send_event(client, customer, identifier="req_3", timestamp=now, value="1.5")
    assert fractional.value.code == "meter_event_invalid_value"


@pytest.mark.parametrize(
    ("offset", "code"),
    [(-35 * DAY - 60, "timestamp_too_far_in_past"), (6 * 60, "timestamp_in_future")],
)
def test_out_of_window_timestamps_are_refused(
    fake: FakeStripe, client: stripe.StripeClient, offset: int, code: str
) -> None:
    make_meter(client)
    customer = make_customer(client)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        send_event(client, customer, identifier="late", timestamp=int(fake.clock()) + offset)
    assert (refused.value.http_status, refused.value.code) == (400, code)
    assert fake.meter_events == []
    send_event(client, customer, identifier="in_window", timestamp=int(fake.clock()) + 4 * 60)


def test_duplicate_identifier_is_rejected_for_24_hours(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    make_meter(client)
    customer = make_customer(client)
    now = int(clock())
    send_event(client, customer, identifier="evt_1", timestamp=now)

    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        send_event(client, customer, identifier="evt_1", timestamp=now)
    assert duplicate.value.http_status == 400
    assert "An event already exists with identifier evt_1" in str(duplicate.value.user_message)
    assert duplicate.value.headers is not None
    assert duplicate.value.headers["stripe-should-retry"] == "false"
    assert len(fake.requests_to("/v1/billing/meter_events")) == 2  # the SDK did not retry
    assert len(fake.meter_events) == 1

    clock.now += DAY
    send_event(client, customer, identifier="evt_1", timestamp=int(clock()))
    assert len(fake.meter_events) == 2


# -- idempotency and retries -------------------------------------------------------------------


def test_idempotency_key_replays_the_first_answer(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    first = client.v1.customers.create({"email": "a@example.com"}, {"idempotency_key": "k1"})
    again = client.v1.customers.create({"email": "a@example.com"}, {"idempotency_key": "k1"})
    assert again.id == first.id
    assert len(fake.customers) == 1
    assert again.last_response is not None
    assert again.last_response.headers["Idempotent-Replayed"] == "true"

    make_meter(client)
    now = int(fake.clock())
    options: stripe.RequestOptions = {"idempotency_key": "usage-1"}
    send_event(client, first.id, identifier="u1", timestamp=now, options=options)
    send_event(client, first.id, identifier="u1", timestamp=now, options=options)
    assert len(fake.meter_events) == 1

    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create({"email": "b@example.com"}, {"idempotency_key": "k1"})


@pytest.mark.usefixtures("fast_retries")
def test_lock_timeout_429_is_retried_with_the_same_key(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    fake.fail_next("/v1/customers", 429, code="lock_timeout")
    customer = client.v1.customers.create({"email": "a@example.com"})
    attempts = fake.requests_to("/v1/customers")
    assert [r.status for r in attempts] == [429, 200]
    assert attempts[0].headers["idempotency-key"] == attempts[1].headers["idempotency-key"]
    assert list(fake.customers) == [customer.id]


@pytest.mark.usefixtures("fast_retries")
def test_rate_limit_429_is_not_retried(fake: FakeStripe, client: stripe.StripeClient) -> None:
    fake.fail_next("/v1/customers", 429, retry_after=1)
    with pytest.raises(stripe.RateLimitError):
        client.v1.customers.create({"email": "a@example.com"})
    assert [r.status for r in fake.requests_to("/v1/customers")] == [429]


@pytest.mark.usefixtures("fast_retries")
def test_server_errors_are_retried_only_when_retries_are_on(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    fake.fail_next("/v1/billing/meters", 500)
    make_meter(client)
    assert [r.status for r in fake.requests_to("/v1/billing/meters")] == [500, 200]

    default = stripe.StripeClient("sk_test_tally", base_addresses={"api": fake.api_base})
    fake.fail_next("/v1/customers", 503)
    with pytest.raises(stripe.APIError):
        default.v1.customers.create({"email": "a@example.com"})
    assert [r.status for r in fake.requests_to("/v1/customers")] == [503]


# -- v2 meter event stream ---------------------------------------------------------------------


def test_v2_meter_event_stream(fake: FakeStripe, client: stripe.StripeClient) -> None:
    make_meter(client)
    customer = make_customer(client)
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    token: stripe.RequestOptions = {"api_key": session.authentication_token}

    client.v2.billing.meter_event_stream.create(
        {
            "events": [
                {
                    "event_name": "api_calls",
                    "identifier": "s1",
                    "timestamp": "2020-01-01T00:00:00.000Z",
                    "payload": {"stripe_customer_id": customer, "value": "3"},
                },
                {
                    "event_name": "api_calls",
                    "identifier": "s2",
                    "payload": {"stripe_customer_id": customer, "value": "4"},
                },
            ]
        },
        token,
    )
    assert [(e.identifier, e.via) for e in fake.meter_events] == [("s2", "stream")]
    assert [(e.identifier, e.code) for e in fake.meter_event_errors] == [
        ("s1", "timestamp_too_far_in_past")
    ]
    sent = fake.requests_to("/v2/billing/meter_event_stream")[0]
    assert sent.base == "meter_events"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == f"Bearer {session.authentication_token}"

    fake.expire_meter_event_sessions()
    with pytest.raises(stripe.TemporarySessionExpiredError):
        client.v2.billing.meter_event_stream.create(
            {"events": [{"event_name": "api_calls", "payload": {"stripe_customer_id": customer}}]},
            token,
        )

    misrouted = stripe.StripeClient(
        "sk_test_tally", base_addresses={"api": fake.api_base, "meter_events": fake.api_base}
    )
    with pytest.raises(stripe.InvalidRequestError) as wrong_host:
        misrouted.v2.billing.meter_event_stream.create({"events": []})
    assert wrong_host.value.http_status == 404


# -- checkout and portal -----------------------------------------------------------------------


def test_checkout_and_billing_portal(fake: FakeStripe, client: stripe.StripeClient) -> None:
    meter = make_meter(client)
    customer = make_customer(client)
    product = client.v1.products.create({"name": "API"}).id
    price = client.v1.prices.create(
        {
            "product": product,
            "currency": "usd",
            "unit_amount_decimal": Decimal("0.2"),
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
        }
    ).id
    session = client.v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "customer": customer,
            "line_items": [{"price": price}],
            "success_url": "https://tally.example/ok",
            "cancel_url": "https://tally.example/cancel",
            "client_reference_id": "acc_1",
            "metadata": {"plan": "pro"},
        }
    )
    assert session.id.startswith("cs_test_")
    assert session.url == f"https://checkout.stripe.com/c/pay/{session.id}"
    assert (session.mode, session.status, session.client_reference_id) == (
        "subscription",
        "open",
        "acc_1",
    )
    with pytest.raises(stripe.InvalidRequestError, match="Quantity should not be specified"):
        client.v1.checkout.sessions.create(
            {
                "mode": "subscription",
                "line_items": [{"price": price, "quantity": 1}],
                "success_url": "https://tally.example/ok",
            }
        )

    portal = client.v1.billing_portal.sessions.create(
        {"customer": customer, "return_url": "https://tally.example/account"}
    )
    assert portal.id.startswith("bps_")
    assert portal.url.startswith("https://billing.stripe.com/p/session/")
    assert fake.portal_sessions[portal.id]["return_url"] == "https://tally.example/account"


def test_unknown_paths_answer_a_stripe_shaped_404(fake: FakeStripe) -> None:
    answer = httpx.post(
        f"{fake.api_base}/v1/nothing_here",
        headers={"Authorization": "Bearer sk_test_tally"},
        data={"a": "b"},
    )
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "Unrecognized request URL" in error["message"]
    assert fake.requests[-1].params == {"a": "b"}


# -- webhooks ----------------------------------------------------------------------------------


def test_webhook_signatures_verify_with_the_sdk() -> None:
    secret = "whsec_test_secret"
    payload = webhook_event(
        "checkout.session.completed", {"id": "cs_test_1", "object": "checkout.session"}
    )
    event = stripe.Webhook.construct_event(payload, sign_webhook(payload, secret), secret)
    assert event.type == "checkout.session.completed"
    assert event.data.object["id"] == "cs_test_1"

    tampered = payload.replace(b"cs_test_1", b"cs_test_2")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered, sign_webhook(payload, secret), secret)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, sign_webhook(payload, "whsec_other"), secret)
    stale = sign_webhook(payload, secret, timestamp=int(time.time()) - 600)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, stale, secret)
