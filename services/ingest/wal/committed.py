"""How far the aggregator has counted: its consumer group's committed offsets, from Kafka.

Read from the broker rather than from any process's memory, so it holds whichever
process runs the aggregator (``tally up`` may be several processes).
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import topics


class CommittedOffsets:
    def __init__(self, bootstrap_servers: str, group: str) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
        self._group = group

    async def start(self) -> None:
        await self._admin.start()

    async def close(self) -> None:
        await self._admin.close()

    async def events(self, partitions: Iterable[int]) -> dict[int, int]:
        """Partition of ``tally.events`` -> the offset of the next record the group will
        read (every record below it is counted); partitions it never committed are absent.

        The partitions are named: asked for all of a group's offsets, Tansu answers in a
        form aiokafka cannot read."""
        wanted = [TopicPartition(topics.EVENTS, p) for p in sorted(set(partitions))]
        if not wanted:
            return {}
        found = await self._admin.list_consumer_group_offsets(self._group, partitions=wanted)
        return {
            tp.partition: meta.offset
            for tp, meta in found.items()
            if tp.topic == topics.EVENTS and meta.offset >= 0
        }
