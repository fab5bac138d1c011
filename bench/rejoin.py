"""Aggregator rejoin: seconds from restarting ``tally aggregator`` to counting again.

The split layout on one machine: the embedded Kafka-protocol broker (Tansu) and one
``tally aggregator`` process with ``KAFKA_BOOTSTRAP_SERVERS``. Each run stops the
aggregator — SIGTERM (it leaves its consumer group on the way out) or SIGKILL (it
cannot: the broker still lists it as a member) — publishes one probe event while it is
down, starts a new process, and measures from the new process's launch to

- ``ready``: its ``/readyz`` answering 200;
- ``counted``: the probe event in its Redis counter, i.e. joined, assigned, consumed
  and stored;

and, from the aggregator's log, ``join``: from its Faust app starting to its partitions
assigned — the part the broker decides, apart from Python's start-up and the stores',
which on a loaded machine vary by seconds.

Each consumer-group session timeout given is measured with a group of its own (Tansu
keeps the session timeout a group was created with): 10 s is Tally's default with Kafka,
2 s the one for Tansu, which holds every JoinGroup for half the group's session timeout.
It runs on its own stores (``bench.stores``), never on ``DATABASE_URL`` / ``REDIS_URL``.

    python -m bench.rejoin --runs 5 --session-timeouts 10,2
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import statistics
import threading
import time
import uuid
from pathlib import Path

import redis

from bench.stores import bench_stores
from services.common import kafka
from services.common.broker import EmbeddedBroker
from tests.probe_support import counted, publish_one
from tests.support import TallyProcess, wait_for

PARTITIONS = 8
PROBE = "bench-rejoin-probe"


def probes_counted(client: redis.Redis) -> int:
    return counted(client, PROBE)


JOINED = re.compile(r"consumer group joined.*since_start_seconds=([0-9.]+)")
Figures = dict[str, list[float]]  # "ready", "counted", "join" -> one value per restart


def joins(aggregator: TallyProcess) -> list[float]:
    """Every join time the aggregator's log reports, oldest first."""
    text = aggregator.log.read_text(errors="replace") if aggregator.log.exists() else ""
    return [float(found) for found in JOINED.findall(text)]


def restart(aggregator: TallyProcess, client: redis.Redis, want: int) -> dict[str, float]:
    """Start ``aggregator`` again; seconds from its launch to ready, to ``want`` probes
    counted (polled every 20 ms from a thread, so readiness polling does not delay it),
    and its app's start to its partitions assigned (its log)."""
    counted_at: list[float] = []
    before = len(joins(aggregator))

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and probes_counted(client) < want:
            time.sleep(0.02)
        counted_at.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    launched = time.monotonic()
    watcher.start()
    aggregator.start(ready_timeout=120)
    ready = time.monotonic() - launched
    watcher.join()
    if probes_counted(client) < want:
        raise SystemExit(f"probe not counted within 120 s:\n{aggregator.tail()}")
    joined = joins(aggregator)[before:]
    return {
        "ready": ready,
        "counted": counted_at[0] - launched,
        "join": joined[0] if joined else float("nan"),
    }


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} s, min {min(values):.2f}, "
        f"max {max(values):.2f} ({len(values)} runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="restarts of each kind")
    parser.add_argument(
        "--session-timeouts", default="10,2", help="consumer-group session timeouts (s)"
    )
    args = parser.parse_args()
    sessions = [float(s) for s in args.session_timeouts.split(",")]
    with (
        bench_stores("tally-bench-rejoin-") as stores,
        EmbeddedBroker(log_path=stores.data_dir / "tansu.log") as broker,
    ):
        bootstrap = broker.bootstrap_servers
        asyncio.run(kafka.ensure_topics(bootstrap, PARTITIONS))
        env = stores.env() | {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "TALLY_EVENTS_PARTITIONS": str(PARTITIONS),
        }
        client = redis.Redis.from_url(stores.redis_url)
        figures: dict[tuple[float, str], Figures] = {}
        for session in sessions:
            group_env = env | {
                "TALLY_KAFKA_SESSION_TIMEOUT": str(session),
                "TALLY_CONSUMER_GROUP": f"bench-rejoin-{uuid.uuid4().hex[:8]}",
            }
            log = Path(stores.data_dir) / f"aggregator-{session}.log"
            measure(
                TallyProcess(["aggregator"], group_env, log),
                client,
                bootstrap,
                session,
                args.runs,
                figures,
            )
        client.close()
    print(f"aggregator restart, split layout, Tansu, {PARTITIONS} partitions:")
    for (session, kind), found in figures.items():
        print(f"  session timeout {session:g} s, after {kind}:")
        print(f"    launch -> probe counted       {summary(found['counted'])}")
        print(f"    launch -> ready               {summary(found['ready'])}")
        print(f"    app start -> group joined     {summary(found['join'])}")


def measure(
    aggregator: TallyProcess,
    client: redis.Redis,
    bootstrap: str,
    session: float,
    runs: int,
    figures: dict[tuple[float, str], Figures],
) -> None:
    """Start ``aggregator``, then stop and restart it ``runs`` times each way."""
    aggregator.start(ready_timeout=120)
    want = probes_counted(client) + 1
    publish_one(bootstrap, PROBE)
    wait_for(lambda: probes_counted(client) >= want, 120, "first probe", aggregator.tail)
    for kind, sig in (("SIGTERM", signal.SIGTERM), ("kill -9", signal.SIGKILL)):
        found = figures.setdefault((session, kind), {"counted": [], "ready": [], "join": []})
        for _ in range(runs):
            time.sleep(1)  # the group settled, as in a real restart
            if sig == signal.SIGKILL:
                aggregator.kill()
            else:
                aggregator.stop(sig)
            publish_one(bootstrap, PROBE)
            took = restart(aggregator, client, probes_counted(client) + 1)
            for name, seconds in took.items():
                found[name].append(seconds)
            print(
                f"session {session:g} s, {kind}: counted {took['counted']:.2f} s,"
                f" ready {took['ready']:.2f} s, joined {took['join']:.2f} s",
                flush=True,
            )
    aggregator.stop(signal.SIGTERM)


if __name__ == "__main__":
    main()
