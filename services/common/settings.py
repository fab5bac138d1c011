"""Configuration, from environment variables (and a ``.env`` file), validated once.

Store URLs use their conventional names (``DATABASE_URL``, ``REDIS_URL``,
``KAFKA_BOOTSTRAP_SERVERS``, ``CLICKHOUSE_URL``); everything else is ``TALLY_*``.
An unset Kafka or ClickHouse URL means "embedded": a Tansu broker started by Tally and
chDB in-process.
"""

from __future__ import annotations

from datetime import timedelta
from email.utils import parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_TOKEN = "dev-service-token"
"""Accepted by default so that `tally up` works out of the box; never in production."""
DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_PEPPER = "dev-pepper-not-secret"
DEV_PORTAL_SECRET = "dev-portal-secret-not-secret"
KAFKA_SESSION_TIMEOUT = 10.0  # seconds, the consumer group's session with Kafka
EMBEDDED_SESSION_TIMEOUT = 2.0  # with Tansu, which holds each JoinGroup for half of it
PLACEHOLDER = "change-me"  # the prefix of the placeholder secrets docker-compose.yml ships


def _alias(name: str) -> AliasChoices:
    return AliasChoices(name, f"TALLY_{name}")


SMTP_STARTTLS = ("auto", "true", "false")
"""``?starttls=`` of an ``smtp://`` URL: when the server offers it, always, never."""


def smtp_url_problem(raw: str) -> None:
    """Raise ``ValueError`` naming what is wrong with an SMTP URL, so a typo in
    ``TALLY_SMTP_URL`` stops the process at start rather than every email later."""
    parts = urlsplit(raw)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("TALLY_SMTP_URL must start with smtp:// or smtps://")
    if not parts.hostname:
        raise ValueError("TALLY_SMTP_URL names no host")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ValueError("TALLY_SMTP_URL has a port that is not a number from 1 to 65535") from None
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(options) - {"starttls"}
    if unknown:
        raise ValueError(f"TALLY_SMTP_URL has unknown options: {', '.join(sorted(unknown))}")
    starttls = options.get("starttls", ["auto"])
    if len(starttls) != 1 or starttls[0] not in SMTP_STARTTLS:
        raise ValueError("TALLY_SMTP_URL: starttls must be one of auto, true, false")
    if parts.scheme == "smtps" and "starttls" in options:
        raise ValueError("TALLY_SMTP_URL: smtps:// is TLS from the start; starttls is for smtp://")
    if bool(parts.username) != bool(parts.password):
        raise ValueError("TALLY_SMTP_URL: give both a user and a password, or neither")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TALLY_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,  # a bad URL's error must not print its password
    )

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/tally", validation_alias=_alias("DATABASE_URL")
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_alias("REDIS_URL"))
    kafka_bootstrap_servers: str | None = Field(
        None, validation_alias=_alias("KAFKA_BOOTSTRAP_SERVERS")
    )
    clickhouse_url: str | None = Field(None, validation_alias=_alias("CLICKHOUSE_URL"))
    clickhouse_database: str = "tally"
    # How long a request waits on a store that does not answer before it is told 503.
    postgres_connect_timeout: int = Field(
        2, ge=2, description="Seconds to open a PostgreSQL connection (libpq's minimum is 2)."
    )
    postgres_pool_timeout: float = Field(
        2.0, gt=0, description="Seconds a request waits for a pooled PostgreSQL connection."
    )
    postgres_answer_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds one exchange with PostgreSQL (a query and its result, a commit)"
        " may take on an open connection; past it the connection is dropped and the caller"
        " gets an error (503 store-unavailable for a request). Bounds what a frozen server"
        " or a dead link holds; also the longest a single query may run.",
    )
    redis_connect_timeout: float = Field(
        2.0, gt=0, description="Seconds to open a Redis connection."
    )
    redis_timeout: float = Field(2.0, gt=0, description="Seconds to wait for a Redis reply.")
    clickhouse_connect_timeout: float = Field(
        2.0, gt=0, description="Seconds to open a connection to a ClickHouse server."
    )

    env: Literal["development", "production"] = Field(
        "development", description="production: refuse to start with the development secrets."
    )
    data_dir: Path = Path(".tally")
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    log_json: bool = False

    service_tokens: Annotated[list[str], NoDecode] = Field(
        [DEV_TOKEN],
        description="Bearer tokens of the seller's own services: emit and enforce for anyone.",
        validation_alias=AliasChoices(
            "service_tokens", "TALLY_SERVICE_TOKENS", "TALLY_INGEST_TOKENS"
        ),
    )
    admin_token: str = DEV_ADMIN_TOKEN
    key_pepper: str = Field(DEV_PEPPER, description="HMAC key for API key hashes; keep secret.")
    key_rotation_grace_seconds: int = 24 * 3600
    reservation_ttl_seconds: int = Field(
        300,
        description="How long a reservation, or a lease's spent units, wait for their events.",
    )
    lease_ttl_ms: int = Field(
        2000,
        ge=100,
        le=60_000,
        description="A lease's lifetime: how soon plan, key and status changes reach holders.",
    )
    lease_share: int = Field(
        8, ge=1, description="A lease takes at most 1/share of what the tightest limit has left."
    )
    trial_expiry: Literal["downgrade", "suspend"] = "downgrade"
    downgrade_plan: str = "free"
    past_due_grace_hours: float = Field(
        168, ge=0, description="How long a past_due account is still admitted."
    )
    redis_failure_mode: Literal["open", "closed"] = "open"
    fallback_rate_per_minute: int = 60
    enforce_redis_timeout: float = 1.0
    enforce_redis_connections: int = 64
    ip_limit_per_second: int = Field(1000, description="Requests per client address; 0 = off.")
    ip_auth_failures_per_minute: int = 20
    trusted_proxies: str = "127.0.0.1"
    max_batch_events: int = 10_000
    lago_batch_max_events: int = Field(
        100,
        ge=1,
        description="Events per Lago batch (`/api/v1/events/batch`), as Lago's"
        " LAGO_EVENTS_BATCH_MAX_LENGTH: more is refused with its 422 `too_many_events`.",
    )
    max_body_bytes: int = 10 * 1024 * 1024
    future_tolerance_seconds: int = 300
    backfill_days: int = 35
    correction_days: int = Field(
        365,
        ge=1,
        le=390,
        description="How far back `POST /v1/customers/{c}/usage/corrections` reaches, in"
        " days: within the 400 days Redis keeps month counters, which a decrease is checked"
        " against.",
    )

    events_partitions: int = 8
    consumer_group: str = "tally-aggregator"
    kafka_incarnation: str = ""
    kafka_in_memory: bool = Field(
        False,
        description="Set by `tally up` for its processes: the broker at KAFKA_BOOTSTRAP_SERVERS"
        " is its embedded one, whose topics die with it, so the aggregator drains it on stop.",
    )
    kafka_session_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds the broker waits for an aggregator's heartbeat before it drops it"
        " from the consumer group. Unset: 10 s with Kafka (whose brokers refuse less than 6 s"
        " by default), 2 s with the embedded broker. Tansu holds every JoinGroup for half the"
        " group's session timeout, so set 2 when KAFKA_BOOTSTRAP_SERVERS is a Tansu broker:"
        " an aggregator restarted then counts again ~1 s after it asks to join, not 5 s.",
    )
    kafka_rebalance_timeout: float = 3.0
    kafka_publish_timeout: float = Field(
        5.0,
        description="Seconds ingest waits for Kafka's acknowledgement before it answers"
        " 503 broker-unavailable (nothing reported accepted; the client retries).",
    )
    # Ingest's write-ahead log (docs/operations.md): a 202 waits for an fsync of the
    # events in data_dir/wal, replayed into the topic on start.  auto: on iff the broker
    # is tally up's own Tansu (in_memory_broker: its topics live in memory); with Kafka,
    # acks=all is enough.
    ingest_wal: Literal["auto", "on", "off"] = "auto"
    ingest_wal_segment_bytes: int = Field(
        4 * 2**20, ge=4096, description="A WAL segment is closed past this size (bytes)."
    )
    ingest_wal_segment_seconds: float = Field(
        2.0, gt=0, description="... or this age: the log is trimmed by whole segments."
    )
    ingest_max_lag_seconds: float = Field(
        10.0,
        ge=0,
        description="Ingest answers 503 overloaded while the aggregator's group is this many"
        " seconds behind the end of tally.events, until it is under half of it; 0 = never.",
    )
    aggregator_batch_records: int = 200
    aggregator_batch_seconds: float = 0.05
    aggregator_insert_rows: int = Field(
        20_000, ge=1, description="ClickHouse rows the aggregator gathers for one insert, ..."
    )
    aggregator_insert_seconds: float = Field(
        2.0,
        gt=0,
        description="... or how long the oldest waits: raw events show in ClickHouse (and"
        " Kafka offsets are committed) this much later than in the live counters.",
    )
    dedupe_window_hours: int = 24
    meter_refresh_seconds: float = 5.0
    aggregator_drain_seconds: float = 60.0
    shutdown_seconds: float = Field(
        9.0,
        description="After SIGTERM/SIGINT a process stops in order within this, or exits"
        " at it (code 70, logged) whatever its stores are doing.",
    )

    up_front_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="`tally up` runs front (ingest, leases, enforcement, the API) this much"
        " nicer than the programs started beside it: on a machine shared with the API it"
        " meters, judging a batch of events waits for the API's requests. 0 = same priority.",
    )
    up_background_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="`tally up` runs back (aggregation, billing, analytics) and the embedded"
        " broker this much nicer than the programs started beside it (and, above"
        " `TALLY_UP_FRONT_NICE`, than front): counting a burst of events waits for the API's"
        " requests and for front's answers, not the other way round. 0 = same priority.",
    )

    rollup_interval_seconds: float = 60.0
    rollup_safety_lag_seconds: float = 5.0
    billing_interval_seconds: float = Field(
        3600.0, description="How often the billing service runs the recent periods' billing."
    )
    invoice_grace_hours: float = Field(
        24.0, description="How long after its period a draft waits for late usage."
    )
    period_end_warning_hours: float = Field(
        24.0, gt=0, description="How long before its period ends a forecast overage is told."
    )
    lifecycle_interval_seconds: float = Field(
        60.0,
        gt=0,
        description="How often billing scans for period ends, trials and keys to tell about.",
    )
    trial_ending_days: float = Field(3.0, gt=0, description="Trial ending: told this early.")
    key_expiring_days: float = Field(7.0, gt=0, description="API key expiring: told this early.")

    alerts_recompile_seconds: float = Field(
        300.0, gt=0, description="How often billing recompiles every customer's alert thresholds."
    )

    stripe_api_key: str | None = Field(None, validation_alias=_alias("STRIPE_API_KEY"))
    stripe_webhook_secret: str | None = Field(
        None, validation_alias=_alias("STRIPE_WEBHOOK_SECRET")
    )
    stripe_api_base: str | None = Field(None, description="Another Stripe API host (tests).")
    stripe_meter_events_base: str | None = None
    stripe_meter_event_stream: bool = Field(
        False, description="Send meter events through the v2 high-throughput stream."
    )
    stripe_push_interval_seconds: float = 10.0
    stripe_sync_interval_seconds: float = 60.0

    catalog_path: Path | None = None

    # Webhook delivery (services.billing.notification)
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        [0, 5, 300, 1800, 7200, 18000, 36000, 36000],
        min_length=1,
        description="Seconds before each attempt (comma-separated; Svix's schedule, ~27.6 h).",
    )
    webhook_timeout_seconds: float = Field(
        15.0, gt=0, le=60, description="How long one webhook attempt waits for a 2xx."
    )
    webhook_lease_seconds: float = Field(
        60.0, gt=0, description="A 'sending' delivery older than this was left by a crash."
    )
    webhook_concurrency: int = Field(64, ge=1, description="Deliveries in flight at once.")
    webhook_per_endpoint: int = Field(
        4, ge=1, description="Deliveries in flight to one endpoint (a slow one holds no more)."
    )
    webhook_max_endpoints: int = Field(10, ge=1, description="Webhook endpoints per customer.")
    webhook_secret_overlap_hours: float = Field(
        24.0, ge=0, description="How long a rotated-out secret still signs."
    )
    notification_poll_seconds: float = Field(
        1.0, gt=0, le=1.0, description="How often the sender looks for due retries."
    )
    notification_consumer: str = Field(
        "", description="This notifier's name in the stream's group (default: the host name)."
    )
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="Where customers reach this API: the base of the links in emails.",
    )
    smtp_url: str | None = Field(
        None,
        description="The mail server notifications are sent through; unset: no email. "
        "smtp://user:pass@host:587 (STARTTLS when the server offers it; ?starttls=true "
        "insists, ?starttls=false never), smtps://user:pass@host:465 (TLS from the start).",
    )
    smtp_from: str = Field(
        "Tally <notifications@localhost>", description="The From of every notification email."
    )
    smtp_timeout: float = Field(
        10.0, gt=0, description="Seconds one email may take, from connecting to the reply."
    )
    smtp_max_connections: int = Field(
        10, ge=1, le=1000, description="Emails sent at once; the rest wait for a connection."
    )
    portal_secret: str = Field(
        DEV_PORTAL_SECRET,
        description="Signs portal tokens and dashboard sessions; rotating it revokes them all.",
    )
    portal_token_ttl_seconds: int = Field(
        3600, ge=60, le=30 * 86400, description="Default lifetime of a portal token."
    )
    portal_frame_ancestors: str = Field(
        "'self'",
        description="Who may show the customer dashboard in a frame (CSP frame-ancestors):"
        " 'self', or origins such as https://app.example.com, space-separated.",
    )
    billing_url: str | None = Field(
        None,
        description="Where the api service reads billing's JSON API for the customer "
        "dashboard when billing runs in another process; unset: in this process.",
    )
    analytics_max_execution_seconds: float = Field(
        10.0, gt=0, le=600, description="Analytics SQL: longest a query may run."
    )
    analytics_max_rows_to_read: int = Field(
        100_000_000, ge=1, description="Analytics SQL: most rows a query may read."
    )
    analytics_max_memory_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Analytics SQL: most memory a query may use."
    )
    analytics_default_rows: int = Field(
        100, ge=1, description="Analytics SQL: rows returned when a query names no LIMIT."
    )
    analytics_max_rows: int = Field(
        50_000, ge=1, description="Analytics SQL: most rows a query may return."
    )

    @field_validator("service_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, raw: object) -> object:
        return [t.strip() for t in raw.split(",") if t.strip()] if isinstance(raw, str) else raw

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, raw: object) -> object:
        return [float(t) for t in raw.split(",") if t.strip()] if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _inserts_within_the_lag_bound(self) -> Settings:
        """Offsets are committed once a batch's raw events are inserted, so the lag ingest
        reads runs about this long plus the commit interval even when all is counted."""
        bound = self.ingest_max_lag_seconds
        if bound and self.aggregator_insert_seconds + 2 >= bound:
            raise ValueError(
                "TALLY_AGGREGATOR_INSERT_SECONDS must be 2 s under"
                f" TALLY_INGEST_MAX_LAG_SECONDS ({bound:g}): the committed offsets that lag"
                " is read from trail the inserts (or set TALLY_INGEST_MAX_LAG_SECONDS=0)"
            )
        return self

    @model_validator(mode="after")
    def _counting_yields_to_answers(self) -> Settings:
        """Back's counting must not take the CPU ahead of front's answers to the API."""
        if self.up_background_nice < self.up_front_nice:
            raise ValueError(
                f"TALLY_UP_BACKGROUND_NICE ({self.up_background_nice}) must be at least"
                f" TALLY_UP_FRONT_NICE ({self.up_front_nice}): counting a burst of events"
                " would otherwise wait for nothing, front's lease answers for it"
            )
        return self

    @field_validator("public_url")
    @classmethod
    def _base_url(cls, raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "TALLY_PUBLIC_URL must be an http(s) URL, e.g. https://api.example.com"
            )
        if parts.query or parts.fragment:
            raise ValueError("TALLY_PUBLIC_URL takes no query or fragment")
        return raw.rstrip("/")

    @field_validator("portal_frame_ancestors")
    @classmethod
    def _frame_ancestors(cls, raw: str) -> str:
        if not raw.strip() or any(c in raw for c in ";,\r\n"):
            raise ValueError(
                "TALLY_PORTAL_FRAME_ANCESTORS: sources separated by spaces, e.g."
                " 'self' https://app.example.com"
            )
        return raw.strip()

    @field_validator("smtp_url")
    @classmethod
    def _smtp(cls, raw: str | None) -> str | None:
        if raw is None or not raw.strip():
            return None
        smtp_url_problem(raw)
        return raw

    @field_validator("smtp_from")
    @classmethod
    def _sender(cls, raw: str) -> str:
        _, address = parseaddr(raw)
        if "@" not in address or any(c in raw for c in "\r\n"):
            raise ValueError(f"TALLY_SMTP_FROM is not an email address: {raw!r}")
        return raw

    @property
    def future_tolerance(self) -> timedelta:
        return timedelta(seconds=self.future_tolerance_seconds)

    @property
    def backfill_window(self) -> timedelta:
        return timedelta(days=self.backfill_days)

    @property
    def correction_window(self) -> timedelta:
        return timedelta(days=self.correction_days)

    @property
    def dedupe_window(self) -> timedelta:
        return timedelta(hours=self.dedupe_window_hours)

    def development_secrets(self) -> list[str]:
        """The secret settings still at a public value — the development defaults, or a
        ``change-me…`` placeholder such as ``docker-compose.yml`` ships — by their
        environment variable's name."""

        def public(value: str, default: str) -> bool:
            return value == default or value.startswith(PLACEHOLDER)

        found = []
        if any(public(token, DEV_TOKEN) for token in self.service_tokens):
            found.append("TALLY_SERVICE_TOKENS")
        if public(self.admin_token, DEV_ADMIN_TOKEN):
            found.append("TALLY_ADMIN_TOKEN")
        if public(self.key_pepper, DEV_PEPPER):
            found.append("TALLY_KEY_PEPPER")
        if public(self.portal_secret, DEV_PORTAL_SECRET):
            found.append("TALLY_PORTAL_SECRET")
        return found

    @property
    def pepper(self) -> bytes:
        return self.key_pepper.encode()

    @property
    def embedded_kafka(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def ingest_wal_enabled(self) -> bool:
        return self.ingest_wal == "on" or (self.ingest_wal == "auto" and self.in_memory_broker)

    @property
    def wal_path(self) -> Path:
        return self.data_dir / "wal"

    @property
    def group_session_timeout(self) -> float:
        """``kafka_session_timeout``, or its default for the broker in use."""
        if self.kafka_session_timeout is not None:
            return self.kafka_session_timeout
        return EMBEDDED_SESSION_TIMEOUT if self.in_memory_broker else KAFKA_SESSION_TIMEOUT

    @property
    def in_memory_broker(self) -> bool:
        """Is the broker ``tally up``'s own Tansu (started here, or by the supervisor for
        this process), whose topics die with it?"""
        return self.embedded_kafka or self.kafka_in_memory

    @property
    def chdb_path(self) -> Path:
        return self.data_dir / "chdb"


@lru_cache
def get_settings() -> Settings:
    return Settings()
