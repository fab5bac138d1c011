"""Prometheus metrics shared by all services, registered once per process.

Services that run together expose one ``/metrics`` page with all of them.  ``tally up``
runs them in several processes: it sets ``PROMETHEUS_MULTIPROC_DIR`` for them
(prometheus_client's multiprocess mode), each process writes its values there, and
``/metrics`` of either process reports the sum over all of them — counters of a process
that was restarted included, gauges of live processes only.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response

EVENTS_ACCEPTED = Counter("tally_ingest_events_accepted_total", "Events accepted by ingest")
EVENTS_REJECTED = Counter(
    "tally_ingest_events_rejected_total", "Events rejected by ingest", ["reason"]
)
EVENTS_DUPLICATE_IN_REQUEST = Counter(
    "tally_ingest_events_duplicate_total", "Events repeated within one ingest request"
)
INGEST_REQUEST_EVENTS = Histogram(
    "tally_ingest_request_events",
    "Events per ingest request",
    buckets=(1, 10, 100, 500, 1000, 5000, 10000),
)
PUBLISH_SECONDS = Histogram("tally_ingest_publish_seconds", "Time to get Kafka acks for a request")
INGEST_CONSUMER_LAG_SECONDS = Gauge(
    "tally_ingest_consumer_lag_seconds",
    "How long ago the oldest record the aggregator's group has not committed was written,"
    " as ingest last read it (the most behind partition)",
    multiprocess_mode="livemax",
)
INGEST_CONSUMER_LAG_RECORDS = Gauge(
    "tally_ingest_consumer_lag_records",
    "Records (envelopes) the aggregator's group has not committed, all partitions",
    multiprocess_mode="livemax",
)
INGEST_OVERLOADED = Counter(
    "tally_ingest_overloaded_total",
    "Requests refused with 503 overloaded while the aggregator was too far behind",
)

AGGREGATED_EVENTS = Counter(
    "tally_aggregator_events_total", "Events processed by the aggregator", ["outcome"]
)
AGGREGATOR_BATCH_RECORDS = Histogram(
    "tally_aggregator_batch_records",
    "Kafka records per aggregator batch",
    buckets=(1, 5, 10, 50, 100, 200, 500, 1000),
)
AGGREGATOR_BATCH_EVENTS = Histogram(
    "tally_aggregator_batch_events",
    "Events per aggregator batch",
    buckets=(1, 10, 100, 1000, 5000, 10000, 50000),
)
SINK_SECONDS = Histogram("tally_sink_seconds", "Time to write one batch to a sink", ["sink"])
CONSUMER_LAG = Gauge(
    "tally_aggregator_consumer_lag",
    "Records behind the partition's end",
    ["partition"],
    multiprocess_mode="livemax",
)
REPLAYED_RECORDS = Counter(
    "tally_aggregator_replayed_records_total",
    "Records skipped by the Redis sink because their offset was already applied",
)

ALERTS_FIRED = Counter(
    "tally_alerts_fired_total",
    "alert.triggered notifications published by the aggregator (a crash may repeat an id)",
)

ROLLUP_ROWS = Counter("tally_rollup_rows_total", "usage_daily/monthly rows written")
ROLLUP_SECONDS = Histogram("tally_rollup_seconds", "Time for one rollup pass")


MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


async def metrics_endpoint(_: Request) -> Response:
    registry = REGISTRY
    if os.environ.get(MULTIPROCESS_DIR):  # tally up: the sum over its processes
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


ENFORCE_DECISIONS = Counter(
    "tally_enforce_decisions_total", "Enforcement decisions, by verdict", ["verdict"]
)
ENFORCE_FALLBACK = Counter(
    "tally_enforce_fallback_total",
    "Decisions taken while Redis was unreachable, by failure mode (open|closed)",
    ["mode"],
)
REDIS_AVAILABLE = Gauge(
    "tally_enforce_redis_available",
    "1 while the limits store answers, 0 since it failed",
    # under `tally up` every process has the gauge, most never set it (0): the last
    # value a deciding process set is the one to tell
    multiprocess_mode="livemostrecent",
)

NOTIFICATIONS = Counter(
    "tally_notifications_total",
    "Notifications stored once each (alert.triggered counts the alerts fired), by type",
    ["type"],
)
DELIVERIES = Counter(
    "tally_notification_deliveries_total",
    "Delivery attempts by channel (webhook|email) and outcome (succeeded|retrying|failed)",
    ["channel", "outcome"],
)
DELIVERY_QUEUE = Gauge(
    "tally_notification_deliveries_pending",
    "Deliveries waiting to be sent or being sent (the notification outbox's depth)",
    multiprocess_mode="livemax",
)
DELIVERY_LATENCY = Histogram(
    "tally_notification_delivery_seconds",
    "From a notification's occurred_at to its successful delivery, by channel",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400),
)
