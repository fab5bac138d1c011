"""Sending one notification email over SMTP, and telling the delivery worker how it went.

One connection per email: notifications are few per customer and a fresh connection
never inherits a half-broken session.  At most ``TALLY_SMTP_MAX_CONNECTIONS`` are open
at once.  The whole exchange, from connecting to the reply
after the message, is bounded by ``TALLY_SMTP_TIMEOUT``.

Every outcome a server or a payload can cause is an ``Attempt``: ``send`` does not raise.
A refusal that is about this message or this recipient (5xx to ``RCPT`` or after
``DATA``, a payload the templates cannot render, an address that is not one) is
``permanent``: retrying cannot help.
Everything else — 4xx replies, a refused or timed-out connection, TLS, a login or sender
address the server refuses (the operator's ``TALLY_SMTP_*`` to fix, after which the
retries go through) — is transient.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import parseaddr

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
)

from schemas.notifications import Notification
from services.billing.notification.channel import Attempt
from services.billing.notification.email.links import Links
from services.billing.notification.email.render import RenderError, message
from services.billing.notification.email.target import SmtpTarget
from services.common.settings import Settings

EXCERPT = 1024
"""How much of a server's reply the delivery log keeps."""


class SmtpMailer:
    """The email channel (``channel.Mailer``): renders a notification and hands it to
    the mail server named by ``TALLY_SMTP_URL``."""

    def __init__(
        self,
        target: SmtpTarget,
        sender: str,
        public_url: str,
        timeout: float,
        max_connections: int = 10,
    ) -> None:
        self.target = target
        self.sender = sender
        self.public_url = public_url.rstrip("/")
        self.timeout = timeout
        self.max_connections = max_connections
        # Mail servers cap connections per client (421 beyond); a burst of alerts waits
        # here instead, and the timeout starts once a connection may open.
        self._connections = asyncio.Semaphore(max_connections)
        self._local_hostname: str | None = None  # our EHLO name, looked up once

    async def send(
        self, notification: Notification, to: str, *, company: str | None = None
    ) -> Attempt:
        """Email ``notification`` to ``to`` (``company`` greets the reader by name)."""
        async with self._connections:
            return await self._send(notification, to, company)

    async def _send(self, notification: Notification, to: str, company: str | None) -> Attempt:
        started = time.perf_counter()
        unusable = _address_problem(to)
        if unusable is not None:
            return _failed(started, None, "", unusable, permanent=True)
        links = Links(self.public_url, notification.customer)
        try:
            mail = message(notification, to, self.sender, links, company)
        except RenderError as exc:
            return _failed(started, None, "", str(exc), permanent=True)
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._deliver(mail, to)
        except TimeoutError:
            error = f"no answer from {self.target} within {self.timeout:g} s"
            return _failed(started, None, "", error)
        except SMTPResponseException as exc:
            return _refused(started, exc, self.target)
        except SMTPConnectError as exc:
            return _failed(started, None, "", f"cannot connect to {self.target}: {_reason(exc)}")
        except (SMTPException, OSError) as exc:
            return _failed(started, None, "", f"cannot talk to {self.target}: {_reason(exc)}")
        return Attempt(
            ok=True,
            status=reply.code,
            response=reply.message[:EXCERPT],
            error=None,
            duration_ms=_since(started),
        )

    async def _deliver(self, mail: EmailMessage, to: str) -> SMTPResponse:
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        target = self.target
        client = SMTP(
            local_hostname=self._local_hostname,
            hostname=target.host,
            port=target.port,
            use_tls=target.implicit_tls,
            start_tls=target.starttls,
            username=target.username,
            password=target.password,
            timeout=self.timeout,
        )
        async with client:
            await client.mail(parseaddr(self.sender)[1])
            await client.rcpt(to)
            return await client.data(mail.as_bytes())


def build_mailer(settings: Settings) -> SmtpMailer | None:
    """The mailer ``TALLY_SMTP_URL`` asks for, or ``None`` when it is unset (no email)."""
    if settings.smtp_url is None:
        return None
    return SmtpMailer(
        SmtpTarget.parse(settings.smtp_url),
        settings.smtp_from,
        settings.public_url,
        settings.smtp_timeout,
        settings.smtp_max_connections,
    )


def _address_problem(to: str) -> str | None:
    """Why ``to`` cannot be written into an envelope and a ``To`` header, if it cannot."""
    if not to.isascii():  # SMTPUTF8 is not spoken here: say so rather than garble it
        return f"an address with non-ASCII characters needs SMTPUTF8: {to!r}"
    try:
        address = Address(addr_spec=to)
    except (ValueError, IndexError, HeaderParseError):
        return f"not an email address: {to!r}"
    if not address.username or not address.domain:
        return f"not an email address: {to!r}"
    return None


def _refused(started: float, exc: SMTPResponseException, target: SmtpTarget) -> Attempt:
    """A reply that is not the one hoped for, and whether retrying could change it."""
    code, text = exc.code, exc.message
    lasting = 500 <= code < 600
    if isinstance(exc, SMTPRecipientRefused):
        what = "refused the recipient" if lasting else "deferred the recipient"
        return _failed(started, code, text, f"{target} {what}", permanent=lasting)
    if isinstance(exc, SMTPDataError):
        what = "refused the message" if lasting else "deferred the message"
        return _failed(started, code, text, f"{target} {what}", permanent=lasting)
    if isinstance(exc, SMTPAuthenticationError):
        return _failed(started, code, text, f"{target} refused the login in TALLY_SMTP_URL")
    if isinstance(exc, SMTPSenderRefused):
        return _failed(started, code, text, f"{target} refused the sender TALLY_SMTP_FROM")
    return _failed(started, code, text, f"{target} answered {code}")


def _failed(
    started: float, status: int | None, response: str, error: str, *, permanent: bool = False
) -> Attempt:
    return Attempt(
        ok=False,
        status=status,
        response=response[:EXCERPT],
        error=error,
        duration_ms=_since(started),
        permanent=permanent,
    )


def _reason(exc: BaseException) -> str:
    """What went wrong in a reader's words: the TLS failure, the operating system's word
    for a network error ("Connection refused"), else the library's message."""
    for cause in (exc, exc.__cause__, exc.__context__):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
    return str(exc) or type(exc).__name__


def _since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
