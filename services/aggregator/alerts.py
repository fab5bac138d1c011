"""Publishing the alert crossings the batch call queued, as ``alert.triggered``.

``apply_batch.lua`` decides (atomically, once per threshold and month) and queues each
crossing in the customer's out list; this module turns them into notifications on the
stream and only then trims what it published.  A crash in between publishes the same
crossings again under the same stable ids, which the notifier stores once: never a lost
alert, never a second id for one.  At start the aggregator sweeps every out list once,
so leftovers from a crash do not wait for the customer's next event.  The trim removes
only what is still the list's head as read (``alerts_trim.lua``): the sweep and the
partition's owner may drain one list at once without dropping what the other added.

The same drain hands customers' whole-invoice spend marks (bumped by the batch call when
it changes a month total of a customer with such rules) over to billing's due set, and
only then clears each mark, unless a batch bumped it meanwhile (``spend_unmark.lua``):
marks live in the customer's slot and the due set in none, so no one script can move
them, and this order never loses one.

Publishing runs beside the batches, not inside them (``wake`` and ``run``): the batch
that queued a crossing only names its customer and goes on to the next, and the
publishing task drains every customer named meanwhile in one pass.  Inline, the drain
was a third of each batch's time when a thousand customers a second crossed, and the
batches behind it (and their crossings) waited for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import datetime

from redis.asyncio import Redis

from schemas import lua, redis_keys
from schemas.alerts import AlertKind, Crossing, parse_crossing
from schemas.catalog import Meter
from schemas.events import from_micros, utcnow
from schemas.notifications import Notification, NotificationType, moment
from schemas.zones import quota_bounds
from services.common import metrics
from services.common.logging import get_logger
from services.common.notify import publish
from services.common.waits import Backoff, surviving

log = get_logger("tally.aggregator.alerts")

PAGE = 100  # crossings read per customer and round trip


class AlertPublisher:
    """Drains customers' crossings lists onto the notification stream."""

    def __init__(self, redis: Redis, meters: Callable[[], dict[str, list[Meter]]]) -> None:
        self._redis = redis
        self._meters = meters
        self._trim = redis.register_script(lua.source("alerts_trim"))
        self._unmark = redis.register_script(lua.source("spend_unmark"))
        self._named: set[str] = set()  # customers whose lists ``run`` drains next
        self._due = asyncio.Event()

    def wake(self, customers: Iterable[str]) -> None:
        """Have ``run`` drain these customers' lists now; returns at once."""
        self._named.update(customers)
        if self._named:
            self._due.set()

    async def run(self) -> None:
        """Drain what ``wake`` named, as soon as it is named, for as long as the process
        serves.  A failed drain keeps its customers named and is tried again (their
        crossings wait in Redis meanwhile: nothing is lost, nothing fires twice)."""
        backoff = Backoff()
        while True:
            await self._due.wait()
            message = "publishing alerts failed; retrying"
            with surviving(log, message, backoff=backoff.seconds) as attempt:
                await self.flush()
            if attempt.failed:
                await backoff.wait()
            else:
                backoff.reset()

    async def flush(self) -> int:
        """Drain every customer named so far (also at stop: nothing waits for a restart's
        sweep); on failure they stay named."""
        self._due.clear()
        customers, self._named = self._named, set()
        try:
            return await self.drain(sorted(customers))
        except BaseException:
            self.wake(customers)
            raise

    async def drain(self, customers: Iterable[str]) -> int:
        """Publish every crossing waiting for these customers; how many were published.

        Three round trips per page however many customers crossed (read the lists' heads,
        publish, trim): a batch in which a thousand customers crossed a threshold must
        not hold the partition up for thousands of round trips."""
        units = {m.name: m.unit for ms in self._meters().values() for m in ms}
        waiting, published = list(customers), 0
        await self._hand_over_spend(waiting)
        while waiting:
            heads = await self._heads(waiting)
            if not heads:
                break
            async with self._redis.pipeline(transaction=False) as pipe:
                for customer, raw in heads.items():
                    for item in raw:
                        crossing = parse_crossing(_text(item))
                        await publish(
                            pipe, notification(customer, crossing, units.get(crossing.meter))
                        )
                await pipe.execute()  # raises unless every XADD succeeded: then no trim
            async with self._redis.pipeline(transaction=False) as pipe:
                for customer, raw in heads.items():
                    await self._trim(keys=[redis_keys.alerts_out(customer)], args=raw, client=pipe)
                await pipe.execute()
            count = sum(len(raw) for raw in heads.values())
            published += count
            metrics.ALERTS_FIRED.inc(count)
            waiting = [customer for customer, raw in heads.items() if len(raw) == PAGE]
        return published

    async def _hand_over_spend(self, customers: list[str]) -> None:
        """Move these customers' spend marks to billing's due set: add, then clear."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for customer in customers:
                pipe.get(redis_keys.spend_mark(customer))
            marks = await pipe.execute()
        marked = {c: m for c, m in zip(customers, marks, strict=True) if m is not None}
        if not marked:
            return
        now_ms = int(utcnow().timestamp() * 1000)
        await self._redis.zadd(redis_keys.SPEND_DUE, dict.fromkeys(marked, now_ms), nx=True)
        async with self._redis.pipeline(transaction=False) as pipe:
            for customer, mark in marked.items():
                await self._unmark(keys=[redis_keys.spend_mark(customer)], args=[mark], client=pipe)
            await pipe.execute()

    async def _heads(self, customers: list[str]) -> dict[str, list[bytes]]:
        """The first page of each customer's out list, for those with any."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for customer in customers:
                pipe.lrange(redis_keys.alerts_out(customer), 0, PAGE - 1)
            pages = await pipe.execute()
        return {customer: raw for customer, raw in zip(customers, pages, strict=True) if raw}

    async def sweep(self) -> int:
        """Drain every customer's out list and hand over every spend mark (at start: what
        a crash left behind)."""
        customers = {
            redis_keys.customer_of(_text(key))
            for pattern in (redis_keys.ALERTS_OUT_PATTERN, redis_keys.SPEND_MARK_PATTERN)
            async for key in self._redis.scan_iter(match=pattern, count=1000)
        }
        published = await self.drain(sorted(customers))
        if published:
            log.info("published alerts left from before the start", count=published)
        return published


def _text(item: bytes | str) -> str:
    return item.decode() if isinstance(item, bytes) else item


def period(month: str) -> tuple[datetime, datetime]:
    """The quota period a month bucket names: the UTC calendar month (``yyyymm``), or
    the customer's local one (``yyyymm@Zone/Name``, ``schemas.zones.quota_month``)."""
    return quota_bounds(month)


def notification(customer: str, crossing: Crossing, unit: str | None) -> Notification:
    """The ``alert.triggered`` notification for a crossing, with its stable id (its payload:
    docs/notifications.md)."""
    threshold = crossing.threshold
    start, end = period(crossing.month)
    data: dict[str, object] = {
        "meter": crossing.meter,
        "period": {"start": moment(start), "end": moment(end)},
        "threshold": {
            "kind": threshold.kind.value,
            "value": str(threshold.value),
            "quantity": str(from_micros(threshold.quantity)),
        },
        "usage": str(from_micros(crossing.total)),
        "limit": None if threshold.limit is None else str(threshold.limit),
        "rule": threshold.rule,
    }
    if unit:
        data["unit"] = unit
    if threshold.kind is AlertKind.SPEND:
        data["currency"] = threshold.currency
    what = (crossing.meter, moment(start), threshold.rule, threshold.kind.value, threshold.value)
    return Notification.decided(NotificationType.ALERT_TRIGGERED, customer, what, utcnow(), data)
