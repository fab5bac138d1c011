"""The brief's scenario with nothing in between faked: events over HTTP into ``tally
ingest``, Tansu, ``tally aggregator`` (alerts evaluated in its Lua, published to the
stream), ``tally billing`` (the notifier: outbox, signed webhooks, SMTP) — out to a
real HTTP receiver and a real SMTP server (aiosmtpd) in this test.

A free customer (1,000 calls included) who signed up with an email, with a webhook
endpoint made over billing's HTTP API: at 800, 900 and 1,000 calls exactly one verified
webhook and one email each, the ``webhook-id`` the notification's id and the email's
``Message-ID`` made from it; client retries of every event, and a replay of the whole
partition by a new consumer group, send nothing more.

And the crash between send and record: ``tally billing`` killed with SIGKILL while the
receiver holds an alert's webhook open; restarted, it sends the alert again once the
delivery's lease has run out, under the same ``webhook-id`` and a valid signature.
"""

from __future__ import annotations

import asyncio
import email
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from standardwebhooks import Webhook

from schemas import redis_keys
from schemas.events import from_micros, utcnow
from schemas.notifications import STREAM
from schemas.windows import Window, bucket_id
from services.common.notify import publish
from services.common.settings import Settings
from tests.accounts_support import Account, running_api, sign_up
from tests.conftest import UNWATCHED_GROUP, env_for
from tests.integration.test_notify_scenario import crossed
from tests.support import TallyProcess, sample_event
from tests.webhook_support import Inbox, Receiver, eventually, receiver, smtp_inbox

pytestmark = pytest.mark.slow
_ids = itertools.count()
QUIET = 3.0  # how long nothing more must arrive once the counters have settled


async def test_800_900_1000_calls_are_one_webhook_and_one_email_each(
    settings: Settings, tmp_path: Path, redis: Redis
) -> None:
    account = await _free_customer(settings)
    customer = account.customer
    await redis.delete(STREAM)  # the notifier's group starts on this test's stream
    async with smtp_inbox() as inbox, receiver() as rx:
        env = env_for(settings)
        billing = _billing(env, tmp_path, inbox)
        aggregator = TallyProcess(["aggregator"], env, tmp_path / "agg.log")
        ingest = TallyProcess(["ingest"], env | UNWATCHED_GROUP, tmp_path / "ingest.log")
        async with _running(billing, aggregator, ingest):
            secret = await _endpoint(billing.url, customer, rx.url("/ok/chain"))
            # billing compiles everyone's alert levels at start: the 80/90/100 % of 1,000
            await eventually(lambda: redis.hlen(redis_keys.alerts(customer)), 30)
            send = _sender(ingest.url, settings.service_tokens[0], customer)

            sent = await send(800)
            await _delivered(rx, inbox, account.email, 1)
            sent += await send(100)
            await _delivered(rx, inbox, account.email, 2)
            sent += await send(100)
            await _delivered(rx, inbox, account.email, 3)

            # every event again (a client's retries), then one new one behind them
            await send(0, again=sent)
            await send(1)
            await eventually(lambda: _month_calls(redis, customer, 1001), 30)
            # the whole partition again: kill -9, a new consumer group reads from the start
            await asyncio.to_thread(aggregator.kill)
            aggregator.env["TALLY_CONSUMER_GROUP"] = f"replay-{uuid.uuid4().hex[:8]}"
            await asyncio.to_thread(aggregator.start)
            await send(1)
            await eventually(lambda: _month_calls(redis, customer, 1002), 30)
            await asyncio.sleep(QUIET)
            log = await _log(billing.url, customer)

    stream = [n for n in await _stream(redis) if n["customer"] == customer]
    assert [n["data"]["threshold"]["value"] for n in stream] == ["80", "90", "100"]
    ids = [n["id"] for n in stream]
    hooks = rx.at("/ok/chain")
    assert [h.headers["webhook-id"] for h in hooks] == ids
    bodies = [Webhook(secret).verify(h.body, h.headers) for h in hooks]
    assert [b["data"]["usage"] for b in bodies] == ["800", "900", "1000"]
    assert all(b["type"] == "alert.triggered" for b in bodies)
    mails = [email.message_from_bytes(content) for content in _mailed(inbox, account.email)]
    assert len(mails) == 3
    assert [_message_id(m) for m in mails] == ids
    assert [n["id"] for n in log] == ids[::-1]  # the delivery log, newest first
    for notification in log:
        states = sorted(
            (d["channel"], d["state"], d["attempts"]) for d in notification["deliveries"]
        )
        assert states == [("email", "succeeded", 1), ("webhook", "succeeded", 1)]


async def test_killed_between_send_and_record_resends_the_same_webhook_id(
    settings: Settings, tmp_path: Path, redis: Redis
) -> None:
    account = await _free_customer(settings)
    customer = account.customer
    await redis.delete(STREAM)
    async with receiver() as rx:
        billing = _billing(env_for(settings), tmp_path, None)
        async with _running(billing):
            secret = await _endpoint(billing.url, customer, rx.url("/hold/crash"))
            alert = crossed(customer, 80)  # what the aggregator publishes at 800 of 1,000
            await publish(redis, alert)
            await rx.wait_for("/hold/crash", 1, within=15)
            await asyncio.to_thread(billing.kill)  # the receiver has it; nothing recorded
            rx.released.set()
            await asyncio.to_thread(billing.start)
            await rx.wait_for("/hold/crash", 2, within=30)  # once the lease has run out
            await asyncio.sleep(QUIET)
            [logged] = await _log(billing.url, customer)

    first, again = rx.at("/hold/crash")
    assert first.headers["webhook-id"] == again.headers["webhook-id"] == alert.id
    assert Webhook(secret).verify(again.body, again.headers)["data"]["usage"] == "800"
    assert Webhook(secret).verify(first.body, first.headers) == Webhook(secret).verify(
        again.body, again.headers
    )
    assert again.at - first.at >= LEASE - 1  # not before the lease ran out
    [delivery] = logged["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("succeeded", 1)  # the first: unrecorded


TIMEOUT = 2.0  # a webhook attempt's bound: the test kills well within it
LEASE = 2 * TIMEOUT + 5  # the shortest lease the sender allows for that timeout


def _billing(env: dict[str, str], tmp_path: Path, inbox: Inbox | None) -> TallyProcess:
    """``tally billing`` with quick delivery settings, on a chDB of its own (the
    aggregator's process holds the other)."""
    quick = {
        "TALLY_DATA_DIR": str(tmp_path / "billing-data"),
        "TALLY_NOTIFICATION_POLL_SECONDS": "0.2",
        "TALLY_WEBHOOK_TIMEOUT_SECONDS": str(TIMEOUT),
        "TALLY_WEBHOOK_LEASE_SECONDS": "1",
        "TALLY_WEBHOOK_RETRY_SCHEDULE": "0,1,1",
        "TALLY_NOTIFICATION_CONSUMER": f"chain-{uuid.uuid4().hex[:6]}",
    }
    if inbox is not None:
        quick["TALLY_SMTP_URL"] = f"smtp://127.0.0.1:{inbox.port}?starttls=false"
    return TallyProcess(["billing"], env | quick, tmp_path / "billing.log")


@asynccontextmanager
async def _running(*processes: TallyProcess) -> AsyncIterator[None]:
    """The processes started side by side, and stopped (or killed) at the end."""
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
        yield
    finally:
        for process in processes:
            if process.process is not None and process.process.poll() is None:
                await asyncio.to_thread(process.stop)


async def _free_customer(settings: Settings) -> Account:
    async with running_api(settings) as api:
        return await sign_up(api, plan="free")


async def _endpoint(billing: str, customer: str, url: str) -> str:
    """A webhook endpoint over billing's HTTP API; its secret (shown once)."""
    async with httpx.AsyncClient(base_url=billing) as client:
        reply = await client.post(
            f"/v1/customers/{customer}/webhook-endpoints",
            json={"url": url, "events": ["alert.triggered"]},
            headers={"Authorization": "Bearer test-token"},
        )
    assert reply.status_code == 201, reply.text
    secret: str = reply.json()["secret"]
    return secret


async def _log(billing: str, customer: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=billing) as client:
        reply = await client.get(
            f"/v1/customers/{customer}/notifications",
            headers={"Authorization": "Bearer test-token"},
        )
    assert reply.status_code == 200, reply.text
    found: list[dict[str, Any]] = reply.json()["notifications"]
    return found


def _sender(url: str, token: str, customer: str) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def send(calls: int, again: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        when = utcnow().isoformat()
        events = again or [
            sample_event(subject=customer, id=f"{customer}-{next(_ids)}", time=when)
            for _ in range(calls)
        ]
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{url}/v1/events", content=orjson.dumps(events), headers=headers
            )
        assert answer.status_code == 202, answer.text
        return events

    return send


async def _delivered(rx: Receiver, inbox: Inbox, to: str, count: int) -> None:
    await rx.wait_for("/ok/chain", count, within=20)
    await eventually(lambda: len(_mailed(inbox, to)) >= count, 20)


def _mailed(inbox: Inbox, to: str) -> list[bytes]:
    """The messages to one address: the notifier also tells the shared test database's
    other customers (their trials ending, keys expiring) while this test runs."""
    return [content for recipients, content in inbox.messages if recipients == [to]]


async def _month_calls(redis: Redis, customer: str, calls: int) -> bool:
    key = redis_keys.counters(
        customer, "api_calls", Window.MONTH, bucket_id(Window.MONTH, utcnow())
    )
    raw = await redis.hget(key, "*")
    return int(from_micros(int(raw or 0))) == calls


async def _stream(redis: Redis) -> list[dict[str, Any]]:
    entries: Any = await redis.xrange(STREAM)
    return [orjson.loads(fields[b"n"]) for _, fields in entries]


def _message_id(mail: Message) -> str:
    """The notification id a ``Message-ID`` (``<msg_…@domain>``) was made from."""
    return str(mail["Message-ID"]).strip("<>").partition("@")[0]
