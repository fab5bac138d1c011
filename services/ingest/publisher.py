"""Publishing accepted events as per-customer envelopes, and rejections to the DLQ.

``publish`` returns only when Kafka has acknowledged every record (acks=all): that is
what lets ingest answer 202 and promise that nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from schemas import envelope, topics
from schemas.events import UsageEvent
from services.ingest.parsing import Verdict


class Publisher:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def publish(self, events: Iterable[UsageEvent], received_at: datetime) -> None:
        by_customer: dict[str, list[UsageEvent]] = defaultdict(list)
        for event in events:
            by_customer[event.subject].append(event)
        deliveries = [
            await self._producer.send(topics.EVENTS, value=payload, key=customer.encode())
            for customer, batch in by_customer.items()
            for payload in envelope.envelopes(customer, batch, received_at)
        ]
        await asyncio.gather(*deliveries)

    async def dead_letter(
        self, rejected: Iterable[Verdict], received_at: datetime, request_id: str
    ) -> None:
        deliveries = [
            await self._producer.send(
                topics.DEAD_LETTERS,
                value=_dead_letter(verdict, received_at, request_id),
                key=_customer_of(verdict.raw),
            )
            for verdict in rejected
        ]
        await asyncio.gather(*deliveries)


def _dead_letter(verdict: Verdict, received_at: datetime, request_id: str) -> bytes:
    letter = {
        "received_at": received_at.isoformat(),
        "request_id": request_id,
        "index": verdict.index,
        "errors": [{"field": e.field, "reason": e.reason} for e in verdict.errors],
        "event": verdict.raw,
    }
    try:
        return orjson.dumps(letter, default=str)
    except TypeError:  # an integer beyond 64 bits, which orjson cannot write (rejected
        # for it, as like as not): the standard library writes any integer
        return json.dumps(letter, default=str).encode()


def _customer_of(raw: Any) -> bytes | None:
    subject = raw.get("subject") if isinstance(raw, dict) else None
    return subject.encode() if isinstance(subject, str) else None
