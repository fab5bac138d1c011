"""One probe event through a real broker, and its count in Redis: how restart tests and
``bench.rejoin`` tell that an aggregator is counting again."""

from __future__ import annotations

import asyncio
import uuid

import redis

from schemas import redis_keys
from schemas.events import UsageEvent, from_micros, utcnow
from schemas.windows import Window, bucket_id
from services.common import kafka
from services.ingest.publisher import Publisher
from tests.support import sample_event


def publish_one(bootstrap: str, customer: str) -> None:
    """Produce one ``api_call`` of ``customer`` as ingest would, acknowledged by Kafka."""
    event = UsageEvent.model_validate(
        sample_event(id=uuid.uuid4().hex, subject=customer, time=utcnow().isoformat())
    )

    async def send() -> None:
        producer = await kafka.start_producer(bootstrap)
        try:
            await Publisher(producer).publish([event], utcnow())
        finally:
            await producer.stop()

    asyncio.run(send())


def counted(client: redis.Redis, customer: str) -> int:
    """The customer's ``api_calls`` counted today, from the live counters."""
    key = redis_keys.counters(customer, "api_calls", Window.DAY, bucket_id(Window.DAY, utcnow()))
    return int(from_micros(int(client.hget(key, redis_keys.TOTAL) or 0)))
