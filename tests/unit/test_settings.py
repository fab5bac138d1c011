"""Which secret settings are still public values: development defaults or placeholders."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.settings import Settings


def test_the_development_defaults_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TALLY_SERVICE_TOKENS", "TALLY_INGEST_TOKENS", "TALLY_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TALLY_KEY_PEPPER", raising=False)
    monkeypatch.delenv("TALLY_PORTAL_SECRET", raising=False)
    assert Settings(_env_file=None).development_secrets() == [
        "TALLY_SERVICE_TOKENS",
        "TALLY_ADMIN_TOKEN",
        "TALLY_KEY_PEPPER",
        "TALLY_PORTAL_SECRET",
    ]


def test_compose_placeholders_count_as_public() -> None:
    settings = Settings(
        service_tokens=["a-real-token", "change-me-service-token"],
        admin_token="change-me-admin-token",
        key_pepper="a-real-pepper",
        portal_secret="a-real-portal-secret",
    )
    assert settings.development_secrets() == ["TALLY_SERVICE_TOKENS", "TALLY_ADMIN_TOKEN"]


def test_real_secrets_are_not_named() -> None:
    settings = Settings(
        service_tokens=["s3cret"], admin_token="adm1n", key_pepper="p3pper", portal_secret="p0rtal"
    )
    assert settings.development_secrets() == []


def test_the_group_session_timeout_defaults_to_the_broker_in_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TALLY_KAFKA_SESSION_TIMEOUT", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    assert Settings(_env_file=None).group_session_timeout == 2.0  # embedded Tansu
    kafka = Settings(_env_file=None, kafka_bootstrap_servers="kafka:9092")
    assert kafka.group_session_timeout == 10.0  # Kafka refuses < 6 s by default
    tansu = kafka.model_copy(update={"kafka_session_timeout": 2.0})
    assert tansu.group_session_timeout == 2.0  # set for a Tansu given by address


@pytest.mark.parametrize("given", ["-1", "20", "ten"])
@pytest.mark.parametrize("field", ["up_background_nice", "up_front_nice"])
def test_tally_ups_niceness_is_a_nice_value(
    monkeypatch: pytest.MonkeyPatch, field: str, given: str
) -> None:
    monkeypatch.setenv(f"TALLY_{field.upper()}", given)
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)
    assert [e["loc"] for e in refused.value.errors()] == [(field,)]


def test_tally_ups_work_runs_nicer_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TALLY_UP_BACKGROUND_NICE", "TALLY_UP_FRONT_NICE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert (settings.up_front_nice, settings.up_background_nice) == (5, 10)


def test_counting_nicer_than_fronts_answers_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_UP_FRONT_NICE", "12")
    monkeypatch.setenv("TALLY_UP_BACKGROUND_NICE", "10")
    with pytest.raises(ValidationError, match=r"TALLY_UP_BACKGROUND_NICE \(10\) must be at least"):
        Settings(_env_file=None)
    monkeypatch.setenv("TALLY_UP_BACKGROUND_NICE", "12")
    assert Settings(_env_file=None).up_background_nice == 12


def test_inserts_gathered_longer_than_the_lag_bound_allows_are_refused() -> None:
    with pytest.raises(ValidationError, match="TALLY_AGGREGATOR_INSERT_SECONDS"):
        Settings(_env_file=None, aggregator_insert_seconds=8, ingest_max_lag_seconds=10)
    assert Settings(_env_file=None, aggregator_insert_seconds=7.5, ingest_max_lag_seconds=10)
    assert Settings(_env_file=None, aggregator_insert_seconds=3600, ingest_max_lag_seconds=0)
