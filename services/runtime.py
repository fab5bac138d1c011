"""The process a ``tally`` command runs: the stores it opens, the services it hosts.

Every command is the same shape: open what the chosen services need (once, shared),
start them, serve their routes plus ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP,
and on Ctrl-C stop them in reverse order so that buffers are flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
import uvloop
from aiokafka import AIOKafkaProducer
from fastapi import APIRouter, FastAPI
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from starlette.routing import Route
from starlette.types import ASGIApp

from services.common import broker, clickhouse, kafka, pages, postgres, problems, shutdown
from services.common import redis as redis_client
from services.common.auth import Authenticator
from services.common.clickhouse import ClickHouse
from services.common.health import Check, health_router
from services.common.hot_paths import HotPaths
from services.common.logging import get_logger
from services.common.meter_cache import MeterCache
from services.common.openapi import document_framework_problems, problem_schemas
from services.common.settings import Settings
from services.common.waits import stop_task
from services.common.zone_book import ZoneBook

log = get_logger("tally")


@dataclass
class Component:
    """What one service contributes to the process."""

    name: str
    routers: list[APIRouter] = field(default_factory=list)
    checks: dict[str, Check] = field(default_factory=dict)
    schemas: dict[str, Any] = field(default_factory=dict)  # extra OpenAPI components
    # Plain Starlette routes for hot paths, answered ahead of the FastAPI application
    # (``hot_paths``), and their OpenAPI path items (FastAPI documents only its own).
    fast_routes: list[Route] = field(default_factory=list)
    paths: dict[str, Any] = field(default_factory=dict)
    # What answers a request no route matches (else 404; a path served for other
    # methods is still a 405): ``tally up``'s front forwards it to its back process.
    fallback: ASGIApp | None = None


class Runtime:
    """Lazily opened, shared connections; closed in reverse order by ``aclose``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # armed by the first SIGTERM/SIGINT; the embedded broker's drain extends it
        self.shutdown = shutdown.Bound(settings.shutdown_seconds)
        self.stack = AsyncExitStack()
        self._bootstrap: str | None = settings.kafka_bootstrap_servers
        self.kafka_incarnation = settings.kafka_incarnation
        self._pool: AsyncConnectionPool | None = None
        self._redis: Redis | None = None
        self._limits: Redis | None = None
        self._authenticator: Authenticator | None = None
        self._meters: MeterCache | None = None
        self._zones: ZoneBook | None = None
        self._clickhouse: ClickHouse | None = None
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Runtime:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.aclose()

    async def bootstrap_servers(self) -> str:
        if self._bootstrap is None:
            embedded = broker.EmbeddedBroker(log_path=self.settings.data_dir / "tansu.log")
            embedded.spawn()  # on the loop's thread: the broker dies with this process
            self.stack.callback(embedded.stop)
            await asyncio.to_thread(embedded.wait_listening, 20.0)
            self._bootstrap = embedded.bootstrap_servers
            self.kafka_incarnation = f"embedded-{uuid.uuid4().hex[:12]}"
            log.info("embedded kafka (tansu) started", bootstrap=self._bootstrap)
            await kafka.ensure_topics(self._bootstrap, self.settings.events_partitions)
        return self._bootstrap

    async def prepare(self, with_clickhouse: bool = True) -> None:
        """Create databases and schemas, run migrations (the catalog is seeded after, by
        its owner: ``services.cli.prepare``).  ``with_clickhouse=False`` leaves the
        ClickHouse tables to the aggregator, which creates them when it starts."""
        url = self.settings.database_url
        await asyncio.to_thread(postgres.ensure_database, url)
        await asyncio.to_thread(postgres.migrate, url)
        if with_clickhouse:
            await asyncio.to_thread(clickhouse.create_schema, self.clickhouse())
        if self.settings.kafka_bootstrap_servers:
            await kafka.ensure_topics(
                await self.bootstrap_servers(), self.settings.events_partitions
            )

    async def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            self._pool = await postgres.open_pool(
                self.settings.database_url,
                connect_timeout=self.settings.postgres_connect_timeout,
                pool_timeout=self.settings.postgres_pool_timeout,
                answer_timeout=self.settings.postgres_answer_timeout,
            )
            self.stack.push_async_callback(self._pool.close)
        return self._pool

    def redis(self) -> Redis:
        if self._redis is None:
            settings = self.settings
            self._redis = redis_client.connect(
                settings.redis_url, settings.redis_connect_timeout, settings.redis_timeout
            )
            self.stack.push_async_callback(self._redis.aclose)
        return self._redis

    def limits_store(self) -> Redis:
        """Redis with short timeouts, for what surrounds decisions (``limits_store``)."""
        if self._limits is None:
            self._limits = redis_client.limits_store(self.settings)
            self.stack.push_async_callback(self._limits.connection_pool.disconnect)
        return self._limits

    async def authenticator(self) -> Authenticator:
        """The process's one authenticator, shared by its services: one owner cache,
        one view of the addresses refused for guessing."""
        if self._authenticator is None:
            self._authenticator = Authenticator(
                self.settings, self.limits_store(), await self.pool()
            )
        return self._authenticator

    async def meters(self) -> MeterCache:
        """The process's one meter cache, shared by its services: one listening
        connection, one copy of the meters."""
        if self._meters is None:
            settings = self.settings
            self._meters = MeterCache(
                await self.pool(),
                settings.database_url,
                settings.meter_refresh_seconds,
                settings.postgres_connect_timeout,
                settings.postgres_answer_timeout,
            )
            await self._meters.start()
            self.stack.push_async_callback(self._meters.stop)
        return self._meters

    async def zones(self) -> ZoneBook:
        """The process's one copy of the customers' billing zones, followed for changes."""
        if self._zones is None:
            self._zones = ZoneBook(self.redis())
            await self._zones.start()
            self.stack.push_async_callback(self._zones.stop)
        return self._zones

    @property
    def authenticates(self) -> bool:
        """Does this process accept credentials (service tokens, keys, the admin token)?"""
        return self._authenticator is not None

    @property
    def clickhouse_open(self) -> bool:
        """Has a service of this process opened ClickHouse (in ``tally up``: chDB)?"""
        return self._clickhouse is not None

    def clickhouse(self) -> ClickHouse:
        if self._clickhouse is None:
            self._clickhouse = clickhouse.connect(self.settings)
            self.stack.callback(self._clickhouse.close)
        return self._clickhouse

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = await kafka.start_producer(await self.bootstrap_servers())
            self.stack.push_async_callback(self._producer.stop)
        return self._producer

    def background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` for as long as the process serves; cancelled on the way out."""
        task = asyncio.create_task(work, name=name)
        self.stack.push_async_callback(stop_task, task)

    # readiness checks shared by the services that use each store
    def check_postgres(self) -> Check:
        async def check() -> None:
            async with (await self.pool()).connection() as conn:
                await conn.execute("SELECT 1")

        return check

    def check_redis(self) -> Check:
        return self.redis().ping

    def check_clickhouse(self) -> Check:
        return lambda: asyncio.to_thread(self.clickhouse().query, "SELECT 1")


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM once it has stopped serving, which would cut our
    own shutdown short; here a signal only asks it to stop, and the process then closes
    its services in order and exits 0 — within ``shutdown_seconds`` of the first signal,
    or it is ended there (``shutdown.Bound``) whatever its stores are doing."""

    def __init__(self, config: uvicorn.Config, bound: shutdown.Bound) -> None:
        super().__init__(config)
        self._bound = bound

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._bound.arm()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def http_app(components: list[Component], title: str = "Tally") -> ASGIApp:
    app = FastAPI(
        title=title,
        version="0.1.0",
        description="Usage metering, limits and billing for companies that sell API access.",
        docs_url=None,  # pages.install serves /docs and /redoc with local assets
        redoc_url=None,
        redirect_slashes=False,  # a 404 naming the path without it (``problems``)
    )
    problems.install(app)
    checks: dict[str, Check] = {}
    schemas: dict[str, Any] = problem_schemas()  # the problem_responses all routers declare
    paths: dict[str, Any] = {}
    fast: list[Route] = []
    for component in components:
        for router in component.routers:
            app.include_router(router)
        checks |= {f"{component.name}.{k}": v for k, v in component.checks.items()}
        schemas |= component.schemas
        paths |= component.paths
        fast += component.fast_routes
    app.router.routes[:0] = fast
    app.include_router(health_router(checks))
    pages.install(app)
    for component in components:
        if component.fallback is not None:
            app.router.default = problems.slashes_here(component.fallback)
    _add_openapi_schemas(app, schemas, paths)
    return HotPaths(app, fast)


def _add_openapi_schemas(app: FastAPI, schemas: dict[str, Any], paths: dict[str, Any]) -> None:
    """Routes that read their body themselves (ingest, for speed) and plain Starlette
    routes still document themselves."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            spec.setdefault("paths", {}).update(paths)
            document_framework_problems(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine on uvloop: its transports cost a fraction of
    asyncio's per request, which is most of what a one-millisecond decision spends."""
    uvloop.run(main)


def server_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """How every Tally process serves HTTP (benchmarks use it for their baselines too)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="off",
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxies,
        # requests still in flight at a shutdown get a share of the shutdown bound
        timeout_graceful_shutdown=max(1, int(settings.shutdown_seconds / 3)),
    )


def freeze_heap() -> None:
    """Take what start-up built out of the garbage collector's sight.

    A full collection walks every object the collector tracks; in a started API process
    that is FastAPI, pydantic, the Kafka and Stripe clients and the app, and it paused
    the process for 20 to 90 ms here: long enough, at 2,000 decisions/s, to push a few
    hundred of them past the latency target.  What start-up built lives as long as the
    process, so freezing it costs nothing, and full collections walk only what serving
    allocates since.
    """
    gc.collect()
    gc.freeze()


class DevelopmentSecrets(RuntimeError):
    """``TALLY_ENV=production`` with secrets still at their development values."""


def check_secrets(runtime: Runtime) -> None:
    """The development secrets are public (they are in the source): a process that
    accepts them says so loudly at start-up, and in production refuses to start."""
    names = runtime.settings.development_secrets() if runtime.authenticates else []
    if not names:
        return
    listed = ", ".join(names)
    if runtime.settings.env == "production":
        raise DevelopmentSecrets(
            f"TALLY_ENV=production refuses the development secrets: set {listed}"
        )
    log.warning(
        f"DEVELOPMENT SECRETS IN USE: anyone who has read Tally's source can authenticate"
        f" here; set {listed} (TALLY_ENV=production refuses to start with them)",
        settings=names,
    )


Starter = Callable[["Runtime"], Awaitable[Component]]
"""A service's ``start``: what it contributes to a process, once it is running."""


async def serve(runtime: Runtime, starters: list[Starter]) -> None:
    """Start the services, serve HTTP until interrupted; the caller's ``async with
    runtime`` then stops everything in reverse order, flushing on the way."""
    settings = runtime.settings
    components = [await start(runtime) for start in starters]
    check_secrets(runtime)
    config = server_config(http_app(components), settings)
    log.info("serving", services=[c.name for c in components], port=config.port)
    freeze_heap()
    await _Server(config, runtime.shutdown).serve()
    log.info("stopping: flushing and closing")
