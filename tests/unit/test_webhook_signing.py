"""Our signatures, as the Standard Webhooks reference library verifies them; the retry
schedule as a setting."""

from __future__ import annotations

import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from services.billing.notification import signing
from services.billing.notification.sender import JITTER, policy
from services.common.settings import Settings

BODY = b'{"type":"webhook.test","timestamp":"2026-12-02T07:00:00Z","data":{"customer":"c"}}'


def test_secret_shape() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 44
    assert secret != signing.new_secret()


def test_both_secrets_of_a_rotation_verify_and_a_third_does_not() -> None:
    old, new, other = signing.new_secret(), signing.new_secret(), signing.new_secret()
    headers = signing.headers([new, old], "msg_1", int(time.time()), BODY)
    assert Webhook(old).verify(BODY, headers)["type"] == "webhook.test"
    assert Webhook(new).verify(BODY, headers)["data"] == {"customer": "c"}
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(BODY + b" ", headers)


def test_an_old_timestamp_is_refused_by_receivers() -> None:
    secret = signing.new_secret()
    headers = signing.headers([secret], "msg_1", int(time.time()) - 600, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, headers)


def test_schedule_setting_and_delays() -> None:
    assert Settings().webhook_retry_schedule == [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    settings = Settings(webhook_retry_schedule="0, 1,2")  # as the environment gives it
    assert settings.webhook_retry_schedule == [0, 1, 2]
    made = policy(settings)
    assert made.lease >= 2 * made.timeout
    delay = made.retry_in(1)
    assert delay is not None and 1 - JITTER <= delay.total_seconds() <= 1 + JITTER
    assert made.retry_in(3) is None  # three attempts in all
    with pytest.raises(ValueError):
        Settings(webhook_retry_schedule="")
