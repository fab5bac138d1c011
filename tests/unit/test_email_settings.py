"""``TALLY_SMTP_URL`` and the other email settings: what they mean, and a clear error for
what they cannot mean (without printing the password)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.billing.notification.email.target import SmtpTarget
from services.billing.notification.sender import policy
from services.common.settings import Settings


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("smtp://mail.example.com", SmtpTarget("mail.example.com", 587, False, None)),
        (
            "smtp://u%40x:p%3Aw@mail.example.com:2525?starttls=true",
            SmtpTarget("mail.example.com", 2525, False, True, "u@x", "p:w"),
        ),
        ("smtp://127.0.0.1:1025?starttls=false", SmtpTarget("127.0.0.1", 1025, False, False)),
        (
            "smtps://u:p@mail.example.com",
            SmtpTarget("mail.example.com", 465, True, False, "u", "p"),
        ),
    ],
)
def test_an_smtp_url_names_host_port_tls_and_login(url: str, target: SmtpTarget) -> None:
    assert SmtpTarget.parse(url) == target


def test_a_target_prints_without_its_password() -> None:
    target = SmtpTarget.parse("smtps://tally:hunter2@mail.example.com")
    assert str(target) == "smtps://tally@mail.example.com:465"
    assert "hunter2" not in repr(target)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://mail.example.com", "must start with smtp:// or smtps://"),
        ("smtp://", "names no host"),
        ("smtp://mail.example.com:99999", "port that is not a number"),
        ("smtp://mail.example.com?starttls=yes", "starttls must be one of auto, true, false"),
        ("smtp://mail.example.com?tls=1", "unknown options: tls"),
        ("smtps://mail.example.com?starttls=true", "smtps:// is TLS from the start"),
        ("smtp://tally@mail.example.com", "both a user and a password"),
    ],
)
def test_a_bad_smtp_url_stops_the_process_naming_the_problem(url: str, error: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, smtp_url=url)
    assert "TALLY_SMTP_URL" in str(raised.value)
    assert error in str(raised.value)


def test_the_error_does_not_print_the_password() -> None:
    with pytest.raises(ValidationError, match="unknown options") as raised:
        Settings(_env_file=None, smtp_url="smtp://tally:s3cret@mail.example.com?tls=1")
    assert "s3cret" not in str(raised.value)


def test_unset_or_blank_means_no_email() -> None:
    assert Settings(_env_file=None).smtp_url is None
    assert Settings(_env_file=None, smtp_url="  ").smtp_url is None


def test_the_sender_and_the_public_url_are_checked() -> None:
    settings = Settings(_env_file=None, public_url="https://tally.example.com/")
    assert settings.public_url == "https://tally.example.com"
    assert settings.smtp_from == "Tally <notifications@localhost>" and settings.smtp_timeout == 10
    with pytest.raises(ValidationError, match="TALLY_SMTP_FROM is not an email address"):
        Settings(_env_file=None, smtp_from="Tally")
    with pytest.raises(ValidationError, match="TALLY_PUBLIC_URL must be an http"):
        Settings(_env_file=None, public_url="ftp://tally.example.com")
    with pytest.raises(ValidationError, match="smtp_timeout"):
        Settings(_env_file=None, smtp_timeout=0)


def test_the_delivery_lease_outlasts_a_slow_mail_server() -> None:
    """An email attempt may take TALLY_SMTP_TIMEOUT: a lease shorter than that would let
    another sender take the row of a mail still being sent, and send it twice."""
    assert (
        policy(Settings(_env_file=None, smtp_timeout=10)).lease == 60
    )  # the default lease already covers it
    assert policy(Settings(_env_file=None, smtp_timeout=50)).lease == 105
    assert policy(Settings(_env_file=None, webhook_timeout_seconds=40, smtp_timeout=5)).lease == 85
