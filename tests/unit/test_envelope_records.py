"""A request's events become one record per partition its customers hash to."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka.partitioner import DefaultPartitioner

from schemas.envelope import decode_shares
from schemas.events import UsageEvent
from services.ingest.publisher import envelope_records, partition_of

RECEIVED = datetime(2026, 11, 3, 10, 15, 30, tzinfo=UTC)
PARTITIONS = tuple(range(8))


def event(n: int, customer: str) -> UsageEvent:
    return UsageEvent.model_validate(
        {
            "specversion": "1.0",
            "id": f"evt-{n}",
            "source": "gateway",
            "type": "api_call",
            "subject": customer,
            "time": "2026-11-03T10:15:00Z",
            "data": {"endpoint": "/v1/x"},
        }
    )


def test_a_request_of_fifty_customers_makes_a_record_per_partition() -> None:
    events = [event(n, f"cust-{n % 50}") for n in range(100)]
    records = envelope_records(events, RECEIVED, PARTITIONS)
    assert len(records) == len({partition_of(e.subject.encode(), PARTITIONS) for e in events})
    assert len(records) <= len(PARTITIONS)
    for record in records:  # its key sends it where each of its customers belongs
        home = partition_of(record.key, PARTITIONS)
        assert {partition_of(c.encode(), PARTITIONS) for c, _ in decode_shares(record.value)} == {
            home
        }
    for customer in {e.subject for e in events}:  # each event once, in order
        got = [
            ev.id
            for r in records
            for c, evs in decode_shares(r.value)
            if c == customer
            for ev in evs
        ]
        assert got == [e.id for e in events if e.subject == customer]


def test_partition_of_is_the_default_partitioners() -> None:
    for n in range(200):
        key = f"customer-{n}".encode()
        assert partition_of(key, PARTITIONS) == DefaultPartitioner()(key, list(PARTITIONS), [])


def test_no_events_no_records() -> None:
    assert envelope_records([], RECEIVED, PARTITIONS) == []
