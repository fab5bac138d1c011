"""Real services for the tests.

PostgreSQL and Redis are the machine's own (``TALLY_TEST_DATABASE_URL``,
``TALLY_TEST_REDIS_URL``); each test session gets a fresh database.  Kafka and ClickHouse
come from testcontainers when a Docker engine answers, else from the embedded Tansu
broker and chDB — the same fallbacks ``tally up`` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from schemas.catalog import Catalog, Meter
from services.api.catalog import store as catalog_store
from services.common import clickhouse, kafka, postgres
from services.common.broker import EmbeddedBroker
from services.common.clickhouse import ClickHouse
from services.common.settings import EMBEDDED_SESSION_TIMEOUT, Settings
from tests.fake_stripe import FakeStripe

ADMIN_URL = os.environ.get(
    "TALLY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TALLY_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
PARTITIONS = 4
KAFKA_CONTAINER_SESSION_TIMEOUT = 6.0
"""The group session timeout on a Kafka container (its brokers refuse less by default).
On the tests' Tansu it is ``EMBEDDED_SESSION_TIMEOUT``, as `tally up` sets it on its own:
Tansu holds every JoinGroup for half of it, so each aggregator start (and each restart
after a kill, which waits for the whole timeout) takes seconds less than at 6 s."""


@functools.cache
def docker_available() -> bool:
    with contextlib.suppress(Exception):
        import docker

        return bool(docker.from_env(timeout=2).ping())
    return False


def pytest_report_header() -> list[str]:
    """Which real services this run talks to: a reader of the log knows what was tested."""
    docker = docker_available()
    return [
        f"kafka: {'Apache Kafka (testcontainers)' if docker else 'Tansu, embedded'}",
        f"clickhouse: {'ClickHouse server (testcontainers)' if docker else 'chDB, in-process'}",
        f"postgresql: {ADMIN_URL}",
        f"redis: {REDIS_URL}",
    ]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if docker_available():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as container:
            bootstrap = container.get_bootstrap_server()
            asyncio.run(kafka.ensure_topics(bootstrap, PARTITIONS))
            yield bootstrap
        return
    with EmbeddedBroker() as broker:
        asyncio.run(kafka.ensure_topics(broker.bootstrap_servers, PARTITIONS))
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def clickhouse_url() -> Iterator[str | None]:
    """A ClickHouse server URL under Docker; ``None`` means chDB at a per-test path."""
    if docker_available():
        from testcontainers.community.clickhouse import ClickHouseContainer

        with ClickHouseContainer("clickhouse/clickhouse-server:24.8") as server:
            host, port = server.get_container_host_ip(), server.get_exposed_port(8123)
            yield f"http://{server.username}:{server.password}@{host}:{port}/"
        return
    yield None


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new database, migrated and seeded with the default catalog; dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlsplit(ADMIN_URL)._replace(path=f"/{name}").geturl()
    postgres.migrate(url)
    asyncio.run(_load_catalog(url))
    yield url
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with fresh_database("tally_test") as url:
        yield url


async def _load_catalog(url: str) -> None:
    async with AsyncConnectionPool(url, open=False) as pool:
        await catalog_store.load(pool, Catalog.default())


@pytest.fixture
def settings(
    tmp_path: Path, database_url: str, kafka_bootstrap: str, clickhouse_url: str | None
) -> Settings:
    return _settings(tmp_path, database_url, kafka_bootstrap, clickhouse_url)


@pytest.fixture(scope="module")
def module_settings(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    kafka_bootstrap: str,
    clickhouse_url: str | None,
) -> Settings:
    """Settings shared by a module's tests, for one ``tally up`` serving them all (starting
    one takes seconds); its tests keep apart by their own plans and customers."""
    tmp = tmp_path_factory.mktemp("module")
    return _settings(tmp, database_url, kafka_bootstrap, clickhouse_url)


def _settings(
    tmp_path: Path, database_url: str, kafka_bootstrap: str, clickhouse_url: str | None
) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        kafka_bootstrap_servers=kafka_bootstrap,
        clickhouse_url=clickhouse_url,
        clickhouse_database=f"tally_{uuid.uuid4().hex[:8]}" if clickhouse_url else "tally",
        data_dir=tmp_path / "data",
        events_partitions=PARTITIONS,
        kafka_session_timeout=(
            KAFKA_CONTAINER_SESSION_TIMEOUT if docker_available() else EMBEDDED_SESSION_TIMEOUT
        ),
        kafka_incarnation=uuid.uuid4().hex[:8],
        consumer_group=f"tally-test-{uuid.uuid4().hex[:8]}",
        service_tokens=["test-token"],
    )


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that makes a ``tally`` subprocess use ``settings``' stores."""
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "TALLY_DATA_DIR": str(settings.data_dir),
        "TALLY_EVENTS_PARTITIONS": str(settings.events_partitions),
        "TALLY_KAFKA_SESSION_TIMEOUT": str(settings.kafka_session_timeout),
        "TALLY_KAFKA_INCARNATION": settings.kafka_incarnation,
        "TALLY_CONSUMER_GROUP": settings.consumer_group,
        "TALLY_SERVICE_TOKENS": ",".join(settings.service_tokens),
        "TALLY_CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "TALLY_LOG_LEVEL": "INFO",
    }
    if settings.kafka_bootstrap_servers:
        env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    if settings.clickhouse_url:
        env["CLICKHOUSE_URL"] = settings.clickhouse_url
    return env


def up_env(settings: Settings, **extra: str) -> dict[str, str]:
    """``env_for`` for ``tally up`` (its own embedded broker) rolling up every second."""
    env = env_for(settings) | {
        "TALLY_ROLLUP_INTERVAL_SECONDS": "1",
        "TALLY_ROLLUP_SAFETY_LAG_SECONDS": "0.5",
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return env | extra


UNWATCHED_GROUP = {"TALLY_INGEST_MAX_LAG_SECONDS": "0"}
"""For an ingest whose test moves the aggregator to a new consumer group (a full replay):
ingest would go on watching the old group, whose lag only grows, and answer 503
``overloaded`` once it passed the bound."""


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(database_url, open=False) as opened:
        yield opened


@pytest.fixture
def tenant() -> str:
    """A customer-id prefix no other test (or earlier run) uses."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ch(settings: Settings) -> Iterator[ClickHouse]:
    """ClickHouse with Tally's tables: chDB under the test's tmp dir, or the container."""
    client = clickhouse.connect(settings)
    clickhouse.create_schema(client)
    yield client
    client.close()


@pytest.fixture
def meters() -> dict[str, list[Meter]]:
    """The default catalog's meters, by the event type they count."""
    index: dict[str, list[Meter]] = {}
    for meter in Catalog.default().meters:
        index.setdefault(meter.event_type, []).append(meter)
    return index


@pytest.fixture(scope="module")
def fake_stripe(database_url: str) -> Iterator[FakeStripe]:
    """A fresh Stripe account per test module: the ids Tally recorded in an earlier
    module's account are forgotten, as they would mean nothing to this one."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM stripe_objects")
    with FakeStripe() as server:
        yield server
