"""``tally up``: the embedded default as a few processes under one supervisor.

One Python process holds the GIL for every service it hosts: ``tally up`` in one process
counted ~18k events/s while its ingest accepted ~1.8x that.  So ``tally up`` prepares the
stores once, starts the embedded broker, and runs two processes of its own:

- **front** — ingest and the API, on the user's port (``TALLY_PORT``); what it has no
  route for it forwards to back (``services.up.proxy``), so the user still sees one port;
- **back** — the aggregator, billing and analytics SQL, the one process that opens chDB,
  on a private loopback port.

Every process it starts dies with it, even by kill -9 (``PR_SET_PDEATHSIG``, armed from
this event loop's thread), and runs in a process group of its own (in the supervisor's
session, so in its scheduling group: ``broker.die_with``), so that a Ctrl-C in the
terminal reaches the supervisor alone and it stops them in order: front first (no more
events taken; what it answered 202 is in the broker), then back (it drains the in-memory
broker into the stores, ``TALLY_KAFKA_IN_MEMORY``), then the broker.  A child that dies
while serving is started again, with a log line; one that keeps failing before it is ready
makes ``tally up`` stop and exit non-zero.

Front runs ``TALLY_UP_FRONT_NICE`` (5) and back and the broker ``TALLY_UP_BACKGROUND_NICE``
(10) nicer than the supervisor (and the programs started beside it): when the machine is
busy, judging a batch of events yields to the requests of the API beside it, and counting
it yields to those and to front's lease and enforcement answers.

The children are started before the stores are prepared: they import their services
(seconds) while this process migrates, and wait at a gate (``services.up.gate``) until
it is done, so a start pays the longer of the two, not their sum.  The embedded broker
is watched too: it holds the topics and the group's offsets in memory, so when it dies
``tally up`` stops and says so (the next start replays what was not counted from
ingest's write-ahead log).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import multiprocess

from services.common import broker, kafka, shutdown
from services.common.logging import get_logger
from services.common.metrics import MULTIPROCESS_DIR
from services.common.settings import Settings
from services.runtime import Runtime
from services.up.gate import Gate

log = get_logger("tally.up")

TALLY = [sys.executable, "-m", "services.cli"]
FRONT, BACK = "front", "back"
READY_SECONDS = 90.0
START_ATTEMPTS = 3
"""A child that exits this many times in a row before it is ready is not retried."""
EXIT_CONFIGURATION = 2
"""A child's exit code for a refused configuration (typer's usage error, development
secrets in production): starting it again would fail the same way."""
WATCH_SECONDS = 0.2
EXTRA_STOP_SECONDS = 2.0
STABLE_SECONDS = 30.0
"""A child that served this long before it died is restarted at once."""
RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Waits before restarting a child that keeps dying soon after it was ready: the first
restart is at once, then longer, capped at the last (no spinning on a crash loop)."""
EXIT_BROKER_DIED = 3

Prepare = Callable[[Runtime], Awaitable[None]]


class GaveUp(Exception):
    """A child kept failing at start (``code`` is what ``tally up`` exits with)."""

    def __init__(self, role: str, code: int) -> None:
        super().__init__(f"the {role} process keeps failing at start")
        self.code = code


class BrokerDied(Exception):
    """The embedded broker exited under ``tally up``."""

    code = EXIT_BROKER_DIED


def restart_delay(quick_deaths: int) -> float:
    """Seconds to wait before restarting a child after its ``quick_deaths``-th death in a
    row within ``STABLE_SECONDS`` of being ready (the first: at once)."""
    return RESTART_DELAYS[min(quick_deaths, len(RESTART_DELAYS)) - 1]


@dataclass
class Child:
    """One process of ``tally up``, started again when it dies."""

    role: str
    port: int
    args: list[str]
    env: dict[str, str]
    metrics_dir: Path
    prepared: asyncio.Event
    """Set once the stores are prepared: until then the child waits at its gate."""
    nice: int = 0
    process: subprocess.Popen[bytes] | None = None

    def hurry(self) -> None:
        """Tell back's aggregator to insert its gathered rows now and stop gathering."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(shutdown.HURRY)

    def spawn(self) -> Gate:
        """On the event loop's thread: the death signal follows the thread that forked."""
        gate = Gate()
        try:
            self.process = subprocess.Popen(
                [*TALLY, "up", "--role", self.role, "--port", str(self.port), *self.args],
                env=os.environ | self.env | gate.env(),
                pass_fds=(gate.read,),
                **broker.as_child(self.nice),
            )
        except BaseException:
            gate.close()
            raise
        finally:
            gate.spawned()
        log.info("process started", role=self.role, pid=self.process.pid, port=self.port)
        return gate

    async def start(self, client: httpx.AsyncClient) -> bool:
        """Spawn it (it imports meanwhile), let it through its gate once the stores are
        prepared, and wait until it is ready (True) or has exited (False)."""
        gate = self.spawn()
        try:
            await self.prepared.wait()
            gate.open()
        finally:
            gate.close()
        return await self.become_ready(client)

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def become_ready(self, client: httpx.AsyncClient) -> bool:
        """Wait until its ``/readyz`` answers 200 (True) or it exits (False)."""
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with asyncio.timeout(READY_SECONDS):
            while self.exit_code is None:
                try:
                    if (await client.get(url, timeout=2.0)).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(WATCH_SECONDS)
        return False

    async def keep(self, client: httpx.AsyncClient) -> None:
        """Start it, and again whenever it dies; raise ``GaveUp`` when it keeps failing
        at start.  Cancelled when ``tally up`` stops."""
        failures = quick_deaths = 0
        while True:
            try:
                started = await self.start(client)
            except TimeoutError:
                log.error("process not ready in time; killing it", role=self.role)
                await self.stop(signal.SIGKILL, 5.0)
                started = False
            if started:
                failures = 0
                log.info("process ready", role=self.role, port=self.port)
                served = await self.serve()
                quick_deaths = 0 if served >= STABLE_SECONDS else quick_deaths + 1
                delay = restart_delay(quick_deaths) if quick_deaths else 0.0
                log.error(
                    "process exited unexpectedly; restarting it",
                    role=self.role,
                    exit_code=self.exit_code,
                    served_seconds=round(served, 1),
                    restart_in_seconds=delay,
                )
                await asyncio.sleep(delay)
                continue
            failures += 1
            code = self.exit_code
            log.error("process failed to start", role=self.role, exit_code=code, attempt=failures)
            if code == EXIT_CONFIGURATION:
                raise GaveUp(self.role, EXIT_CONFIGURATION)
            if failures >= START_ATTEMPTS:
                raise GaveUp(self.role, 1)
            await asyncio.sleep(0.5 * failures)

    async def serve(self) -> float:
        """Until the ready child exits; how long it served."""
        began = asyncio.get_running_loop().time()
        pid = self.process.pid if self.process else 0
        await self.exited()
        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        return asyncio.get_running_loop().time() - began

    async def exited(self) -> int:
        """Its exit code, once it has exited (waited for on a thread of its own)."""
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait)

    async def stop(self, sig: int, seconds: float) -> int | None:
        """Signal it and wait up to ``seconds`` for it to exit; SIGKILL after that."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            async with asyncio.timeout(seconds):
                await self.exited()
        except TimeoutError:
            log.error("process did not stop in time; killing it", role=self.role)
            process.kill()
            await asyncio.to_thread(process.wait)
        return process.returncode


class Supervisor:
    def __init__(self, settings: Settings, prepare: Prepare, demo: bool) -> None:
        self.settings = settings
        self.prepare = prepare
        self.demo = demo
        self.broker: broker.EmbeddedBroker | None = None

    async def run(self) -> int:
        settings = self.settings
        metrics = metrics_dir(settings)
        env = await self._kafka_env() | {MULTIPROCESS_DIR: str(metrics)}
        prepared = asyncio.Event()
        back, front = self._children(env, metrics, prepared)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        code = 0
        tasks: list[asyncio.Task[None]] = []
        async with httpx.AsyncClient() as client:
            try:
                # the children import while the stores are prepared, then pass their gate;
                # both at once: front's start waits for back's answers, not its start
                tasks.append(asyncio.create_task(back.keep(client), name=BACK))
                tasks.append(asyncio.create_task(front.keep(client), name=FRONT))
                tasks.append(asyncio.create_task(self._prepare(prepared), name="prepare"))
                if self.broker is not None:
                    watch = self._watch_broker(self.broker)
                    tasks.append(asyncio.create_task(watch, name="broker"))
                await _until(stopping, tasks)
            except (GaveUp, BrokerDied) as exc:
                log.error("stopping: " + str(exc))
                code = exc.code
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                stopped = await self._stop(front, back)
                code = code or stopped  # the cause first, else a child's failed stop
        return code

    async def _prepare(self, prepared: asyncio.Event) -> None:
        """Migrations and the catalog (``prepare``); then the children may start.  The
        ClickHouse tables are back's aggregator's to create, in the one process that
        opens chDB."""
        async with Runtime(self.settings) as runtime:
            await self.prepare(runtime)
        log.info("stores prepared")
        prepared.set()

    async def _watch_broker(self, embedded: broker.EmbeddedBroker) -> None:
        """Raise ``BrokerDied`` when the embedded broker exits (waited for on a thread of
        its own, which ends when ``_stop`` stops the broker)."""
        code = await asyncio.to_thread(embedded.wait)
        raise BrokerDied(
            f"the embedded broker exited (code {code}): its topics and the"
            " consumer group's offsets were in its memory; start tally up again — events"
            " acknowledged and not yet counted are replayed from ingest's write-ahead log"
        )

    def _children(
        self, env: dict[str, str], metrics: Path, prepared: asyncio.Event
    ) -> tuple[Child, Child]:
        """Back, on a free loopback port, and front on the user's, forwarding to back."""
        settings = self.settings
        back_port = broker.free_port()
        back_url = f"http://127.0.0.1:{back_port}"
        front_bound, back_bound = shutdown_shares(settings)
        back_env = env | {
            "TALLY_HOST": "127.0.0.1",
            "TALLY_SHUTDOWN_SECONDS": str(back_bound),
            # back's only client is front, which names the client in X-Forwarded-For: the
            # user's trusted proxies are front's, and with them back would see 127.0.0.1
            # for everyone (one failed-credential counter for all clients)
            "TALLY_TRUSTED_PROXIES": "127.0.0.1",
        }
        back = Child(BACK, back_port, [], back_env, metrics, prepared, settings.up_background_nice)
        front_args = ["--back-url", back_url, *(["--demo"] if self.demo else [])]
        front_env = env | {
            "TALLY_BILLING_URL": back_url,
            "TALLY_SHUTDOWN_SECONDS": str(front_bound),
        }
        front = Child(
            FRONT, settings.port, front_args, front_env, metrics, prepared, settings.up_front_nice
        )
        return back, front

    async def _kafka_env(self) -> dict[str, str]:
        """The broker the children use: the user's, or an embedded one started here."""
        if not self.settings.embedded_kafka:
            return {}
        embedded = broker.EmbeddedBroker(
            log_path=self.settings.data_dir / "tansu.log", nice=self.settings.up_background_nice
        )
        embedded.spawn()  # on the loop's thread: the broker dies with this process
        self.broker = embedded
        await asyncio.to_thread(embedded.wait_listening, 20.0)
        await kafka.ensure_topics(embedded.bootstrap_servers, self.settings.events_partitions)
        log.info("embedded kafka (tansu) started", bootstrap=embedded.bootstrap_servers)
        return {
            "KAFKA_BOOTSTRAP_SERVERS": embedded.bootstrap_servers,
            # offsets stored by the aggregator belong to this broker's life only
            "TALLY_KAFKA_INCARNATION": f"embedded-{uuid.uuid4().hex[:12]}",
            "TALLY_KAFKA_IN_MEMORY": "true",
        }

    async def _stop(self, front: Child, back: Child) -> int:
        """Front first (it stops taking events), then back (it drains the in-memory
        broker), then the broker.  Each child ends itself at its share of the shutdown
        bound (``shutdown_shares``); this one's covers the whole, drain included, and
        ends the supervisor (and so, by their death signal, every child) if a step
        hangs."""
        settings = self.settings
        front_bound, back_bound = shutdown_shares(settings)
        drain = settings.aggregator_drain_seconds
        shutdown.exit_after(settings.shutdown_seconds + drain + 2 * EXTRA_STOP_SECONDS)
        log.info("stopping: front, then back, then the broker")
        back.hurry()  # front waits for what it logged to be committed: no gathering now
        codes = [await front.stop(signal.SIGTERM, front_bound + EXTRA_STOP_SECONDS)]
        codes.append(await back.stop(signal.SIGTERM, back_bound + drain + EXTRA_STOP_SECONDS))
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        failed = [c for c in codes if c not in (None, 0, -signal.SIGTERM)]
        log.info("stopped", exit_codes=codes)
        return failed[0] if failed else 0


def shutdown_shares(settings: Settings) -> tuple[float, float]:
    """``TALLY_SHUTDOWN_SECONDS`` split between front and back, which stop one after
    the other, so that the whole stops within it even with a store hung.  Front has
    little to finish (requests in flight; every 202 is already in the broker, so cutting
    it loses nothing acknowledged): a third.  Back, the batch in hand and the drain
    (which, while it moves, gets its share again: a backlog is counted, not cut), the rest."""
    front = round(settings.shutdown_seconds / 3, 2)
    return front, round(settings.shutdown_seconds - front, 2)


def metrics_dir(settings: Settings) -> Path:
    """Where the children write their metrics (``services.common.metrics``), emptied at
    each start: what an earlier run counted is not this one's."""
    path = (settings.data_dir / "metrics").resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


async def _until(stopping: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    """Until ``stopping`` is set; a task that fails raises its error (``GaveUp``,
    ``BrokerDied``, the preparation's); one that is done (the preparation) is let go."""
    waiting = asyncio.create_task(stopping.wait())
    watched: set[asyncio.Task[Any]] = {waiting, *tasks}
    try:
        while waiting in watched:
            done, watched = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {waiting}:
                task.result()
    finally:
        waiting.cancel()
