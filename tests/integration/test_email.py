"""The email channel against a real SMTP server: aiosmtpd, in-process on 127.0.0.1.

Each test reads what the server received (envelope and message, parsed with the
standard library) and the ``Attempt`` the mailer answered with.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from schemas.notifications import NotificationType
from services.api import service as api_service
from services.billing import service as billing_service
from services.billing.notification.channel import Mailer
from services.billing.notification.email import SmtpMailer, build_mailer, render
from services.billing.notification.email.links import Links
from services.billing.notification.email.target import SmtpTarget
from services.common.clickhouse import ClickHouse
from services.common.settings import Settings
from services.runtime import Runtime, http_app
from tests.accounts_support import sign_up
from tests.email_support import EXPECTED, sample

SENDER = "Tally <notifications@tally.test>"
PUBLIC = "https://api.tally.test"


class Inbox:
    """An aiosmtpd handler that keeps every message, refuses ``nobody@`` for good (550)
    and defers ``busy@`` (450)."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.encrypted: list[bool] = []  # whether each message came over TLS

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 <nobody@example.com>: no such user here"
        if address.startswith("busy@"):
            return "450 4.2.1 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        transport = server.transport
        self.encrypted.append(
            transport is not None and bool(transport.get_extra_info("ssl_object"))
        )
        return "250 2.0.0 Ok: queued as 4F2A"

    def messages(self) -> list[EmailMessage]:
        parse = BytesParser(policy=default).parsebytes
        return [parse(e.original_content or b"") for e in self.envelopes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_login(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"tally", b"p@ss w")
    return AuthResult(success=ok, handled=False)  # False: aiosmtpd answers 535 itself


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    handler, port = Inbox(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def guarded_inbox() -> Iterator[tuple[Inbox, int]]:
    """A server that wants a login (over plain text: a test has no certificate)."""
    handler, port = Inbox(), free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=check_login,
        auth_required=True,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
async def mute_port() -> AsyncIterator[int]:
    """A server that accepts the connection and never says a word."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def mailer(url: str, timeout: float = 5.0) -> SmtpMailer:
    return SmtpMailer(SmtpTarget.parse(url), SENDER, PUBLIC, timeout)


def body(mail: EmailMessage, subtype: str) -> str:
    part = mail.get_body(preferencelist=(subtype,))
    assert part is not None and part.get_content_type() == f"text/{subtype}"
    return str(part.get_content())


@pytest.mark.parametrize("kind", list(NotificationType))
async def test_every_type_arrives_with_its_numbers_and_link(
    inbox: tuple[Inbox, int], kind: NotificationType
) -> None:
    handler, port = inbox
    notification = sample(kind)
    attempt = await mailer(f"smtp://127.0.0.1:{port}?starttls=false").send(
        notification, "billing@acme.example", company="Acme Corp"
    )
    assert attempt.ok and attempt.status == 250 and attempt.error is None, attempt
    assert attempt.response == "2.0.0 Ok: queued as 4F2A"
    [envelope] = handler.envelopes
    assert envelope.mail_from == "notifications@tally.test"
    assert envelope.rcpt_tos == ["billing@acme.example"]
    [mail] = handler.messages()
    subject, numbers, link = EXPECTED[kind]
    assert mail["Subject"] == subject
    assert mail["From"] == SENDER and mail["To"] == "billing@acme.example"
    assert mail["Message-ID"] == f"<{notification.id}@tally.test>"
    assert mail["X-Tally-Notification-Id"] == notification.id
    assert mail["X-Tally-Notification-Type"] == kind.value
    assert mail.get_content_type() == "multipart/alternative"
    text, html = body(mail, "plain"), body(mail, "html")
    for part in (text, html):
        assert "Hello Acme Corp," in part
        for number in numbers:
            assert number in part, (number, part)
    assert PUBLIC + link in text
    assert f'href="{PUBLIC}{link}' in html.replace("&amp;", "&")


async def test_a_resend_is_the_same_message(inbox: tuple[Inbox, int]) -> None:
    """Same notification, same Message-ID: a mail client threads or drops the repeat."""
    handler, port = inbox
    notification = sample(NotificationType.QUOTA_EXHAUSTED)
    channel = mailer(f"smtp://127.0.0.1:{port}?starttls=false")
    for _ in range(2):
        assert (await channel.send(notification, "ops@acme.example")).ok
    first, second = handler.messages()
    assert first["Message-ID"] == second["Message-ID"] == f"<{notification.id}@tally.test>"


class SlowInbox(Inbox):
    """Takes a while over each message, and counts how many it is taking at once."""

    def __init__(self) -> None:
        super().__init__()
        self.open = self.most_open = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        await asyncio.sleep(0.1)
        self.open -= 1
        return await super().handle_DATA(server, session, envelope)


async def test_a_burst_waits_for_a_connection_and_each_wait_is_not_a_timeout() -> None:
    handler, port = SlowInbox(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        channel = SmtpMailer(
            SmtpTarget.parse(f"smtp://127.0.0.1:{port}?starttls=false"),
            SENDER,
            PUBLIC,
            timeout=1,
            max_connections=2,
        )
        burst = [sample(NotificationType.QUOTA_EXHAUSTED, f"c{n}") for n in range(12)]
        attempts = await asyncio.gather(*(channel.send(n, "ops@acme.example") for n in burst))
    finally:
        controller.stop()
    assert all(a.ok for a in attempts), attempts  # 12 x 0.1 s / 2 > the 1 s timeout
    assert handler.most_open == 2 and len(handler.envelopes) == 12


async def test_a_refused_recipient_is_a_permanent_failure(inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    attempt = await mailer(f"smtp://127.0.0.1:{port}?starttls=false").send(
        sample(NotificationType.INVOICE_FINALIZED), "nobody@example.com"
    )
    assert not attempt.ok and attempt.permanent and attempt.status == 550
    assert "no such user here" in attempt.response
    assert attempt.error == f"smtp://127.0.0.1:{port} refused the recipient"
    assert handler.envelopes == []


async def test_a_deferred_recipient_is_retried(inbox: tuple[Inbox, int]) -> None:
    _, port = inbox
    attempt = await mailer(f"smtp://127.0.0.1:{port}?starttls=false").send(
        sample(NotificationType.INVOICE_FINALIZED), "busy@example.com"
    )
    assert not attempt.ok and not attempt.permanent and attempt.status == 450
    assert attempt.error == f"smtp://127.0.0.1:{port} deferred the recipient"


async def test_a_server_that_is_down_is_a_transient_failure() -> None:
    port = free_port()  # nothing listens there
    started = time.perf_counter()
    attempt = await mailer(f"smtp://127.0.0.1:{port}?starttls=false", timeout=2).send(
        sample(NotificationType.TRIAL_ENDING), "billing@acme.example"
    )
    assert time.perf_counter() - started < 2
    assert not attempt.ok and not attempt.permanent and attempt.status is None
    assert attempt.error is not None
    assert attempt.error == f"cannot connect to smtp://127.0.0.1:{port}: Connection refused"


async def test_a_server_that_never_answers_is_bounded_by_the_timeout(mute_port: int) -> None:
    started = time.perf_counter()
    attempt = await mailer(f"smtp://127.0.0.1:{mute_port}?starttls=false", timeout=0.5).send(
        sample(NotificationType.TRIAL_ENDING), "billing@acme.example"
    )
    elapsed = time.perf_counter() - started
    assert 0.4 < elapsed < 1.5, elapsed
    assert not attempt.ok and not attempt.permanent and attempt.status is None
    assert attempt.error == f"no answer from smtp://127.0.0.1:{mute_port} within 0.5 s"
    assert 400 <= attempt.duration_ms < 1500


async def test_insisting_on_starttls_never_falls_back_to_plain_text(
    inbox: tuple[Inbox, int],
) -> None:
    handler, port = inbox  # this server offers no STARTTLS
    attempt = await mailer(f"smtp://127.0.0.1:{port}?starttls=true").send(
        sample(NotificationType.PLAN_CHANGED), "billing@acme.example"
    )
    assert not attempt.ok and not attempt.permanent
    assert attempt.error is not None and "STARTTLS" in attempt.error
    assert handler.envelopes == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_a_login_from_the_url(guarded_inbox: tuple[Inbox, int]) -> None:
    handler, port = guarded_inbox
    notification = sample(NotificationType.PLAN_CHANGED)
    good = await mailer(f"smtp://tally:p%40ss%20w@127.0.0.1:{port}").send(
        notification, "billing@acme.example"
    )
    assert good.ok, good
    assert len(handler.envelopes) == 1
    bad = await mailer(f"smtp://tally:wrong@127.0.0.1:{port}").send(
        notification, "billing@acme.example"
    )
    assert not bad.ok and not bad.permanent and bad.status == 535
    assert bad.error == f"smtp://tally@127.0.0.1:{port} refused the login in TALLY_SMTP_URL"
    assert "wrong" not in f"{bad}"
    anonymous = await mailer(f"smtp://127.0.0.1:{port}").send(notification, "billing@acme.example")
    assert not anonymous.ok and not anonymous.permanent and anonymous.status == 530
    assert len(handler.envelopes) == 1


async def test_what_cannot_be_sent_is_not_retried(inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    channel = mailer(f"smtp://127.0.0.1:{port}?starttls=false")
    broken = sample(NotificationType.INVOICE_FINALIZED, total=None)
    attempt = await channel.send(broken, "billing@acme.example")
    assert not attempt.ok and attempt.permanent and attempt.status is None
    assert attempt.error is not None and "invoice.finalized" in attempt.error
    for address in ("", "not an address", "a@", "a@example.com\r\nBcc: victim@example.com"):
        attempt = await channel.send(sample(NotificationType.PLAN_CHANGED), address)
        assert not attempt.ok and attempt.permanent, address
        assert attempt.error == f"not an email address: {address!r}"
    attempt = await channel.send(sample(NotificationType.PLAN_CHANGED), "jörg@example.com")
    assert not attempt.ok and attempt.permanent
    assert (
        attempt.error == "an address with non-ASCII characters needs SMTPUTF8: 'jörg@example.com'"
    )
    assert handler.envelopes == []


def test_build_mailer_follows_the_settings() -> None:
    none: Mailer | None = build_mailer(Settings(_env_file=None, smtp_url=None))  # the seam
    assert none is None
    built = build_mailer(
        Settings(
            _env_file=None,
            smtp_url="smtps://tally:s3cret@mail.example.com",
            smtp_from=SENDER,
            smtp_timeout=3,
            smtp_max_connections=4,
            public_url="https://api.example.com/",
        )
    )
    assert built is not None
    assert built.target == SmtpTarget("mail.example.com", 465, True, False, "tally", "s3cret")
    assert (built.sender, built.public_url, built.timeout, built.max_connections) == (
        SENDER,
        "https://api.example.com",
        3,
        4,
    )


LINK = re.compile(r"https?://t(/[^\s\"<>]*)")


async def test_the_links_lead_somewhere_real(settings: Settings, ch: ClickHouse) -> None:
    """Every link an email carries, followed with the customer's own key, answers 200; every
    API-reference anchor names an operation the served OpenAPI document has."""
    async with Runtime(settings) as runtime:
        app = http_app([await api_service.start(runtime), await billing_service.start(runtime)])
        transport = httpx.ASGITransport(app, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            account = await sign_up(client)
            operations = {
                (tag, op.get("operationId"))
                for path in (await client.get("/openapi.json")).json()["paths"].values()
                for op in path.values()
                for tag in op.get("tags", [])
            }
            followed: set[str] = set()
            for kind in NotificationType:
                rendered = render(
                    sample(kind, account.customer), Links("http://t", account.customer)
                )
                for path in set(LINK.findall(rendered.text)) - followed:
                    followed.add(path)
                    if "#tag/" in path:
                        tag, operation = path.split("#tag/")[1].split("/operation/")
                        assert (tag, operation) in operations, path
                    elif not path.endswith("/notifications"):  # the delivery log's own route
                        reply = await client.get(path, headers=account.auth)
                        assert reply.status_code == 200, (path, reply.text)
    assert len(followed) >= 10, followed


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made by the machine's openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate with")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.fixture
def tls_inbox(certificate: tuple[Path, Path]) -> Iterator[tuple[Inbox, int]]:
    """A server that offers STARTTLS and takes a login only after it."""
    handler, port = Inbox(), free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_tls(certificate),
        require_starttls=True,
        authenticator=check_login,
        auth_required=True,
    )
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def smtps_inbox(certificate: tuple[Path, Path]) -> Iterator[tuple[Inbox, int]]:
    handler, port = Inbox(), free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, ssl_context=server_tls(certificate)
    )
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


async def test_starttls_when_offered_then_the_login(
    tls_inbox: tuple[Inbox, int],
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, port = tls_inbox
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # trust the test's own CA
    attempt = await mailer(f"smtp://tally:p%40ss%20w@127.0.0.1:{port}").send(
        sample(NotificationType.PAYMENT_FAILED), "billing@acme.example"
    )
    assert attempt.ok, attempt
    assert handler.encrypted == [True]


async def test_an_untrusted_certificate_is_refused(tls_inbox: tuple[Inbox, int]) -> None:
    handler, port = tls_inbox
    attempt = await mailer(f"smtp://tally:p%40ss%20w@127.0.0.1:{port}").send(
        sample(NotificationType.PAYMENT_FAILED), "billing@acme.example"
    )
    assert not attempt.ok and not attempt.permanent
    assert attempt.error == (
        f"cannot talk to smtp://tally@127.0.0.1:{port}: "
        "TLS: certificate verify failed: self-signed certificate"
    )
    assert handler.envelopes == []


async def test_smtps_is_tls_from_the_first_byte(
    smtps_inbox: tuple[Inbox, int],
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, port = smtps_inbox
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    attempt = await mailer(f"smtps://127.0.0.1:{port}").send(
        sample(NotificationType.INVOICE_FINALIZED), "billing@acme.example"
    )
    assert attempt.ok, attempt
    assert handler.encrypted == [True]
