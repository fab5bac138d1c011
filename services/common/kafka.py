"""Kafka clients: topic creation and the acks=all producer ingest publishes with."""

from __future__ import annotations

from contextlib import suppress

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas import topics


async def ensure_topics(bootstrap_servers: str, partitions: int) -> None:
    """Create Tally's topics if they are missing; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=1)
            for name in (topics.EVENTS, topics.DEAD_LETTERS)
            if name not in existing
        ]
        if wanted:
            with suppress(TopicAlreadyExistsError):  # another process won the race
                await admin.create_topics(wanted)
    finally:
        await admin.close()


async def start_producer(bootstrap_servers: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=False,
        linger_ms=2,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
        request_timeout_ms=30_000,
    )
    await producer.start()
    return producer
