"""Where and how to reach the mail server, from ``TALLY_SMTP_URL``.

``smtp://[user:pass@]host[:port][?starttls=auto|true|false]`` talks plain SMTP (port 587 by
default) and upgrades with STARTTLS when the server offers it (``auto``), always
(``true``: a server without it is an error, never a plain-text fallback) or never
(``false``: a local catcher such as ``smtp://127.0.0.1:1025?starttls=false``).
``smtps://[user:pass@]host[:port]`` is TLS from the first byte (port 465 by default).
User and password are percent-decoded, so ``p%40ss`` is ``p@ss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from services.common.settings import smtp_url_problem

_STARTTLS = {"auto": None, "true": True, "false": False}


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool  # smtps://
    starttls: bool | None  # aiosmtplib's start_tls: None = when offered
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SmtpTarget:
        """The target an SMTP URL names; ``ValueError`` says what is wrong with one."""
        smtp_url_problem(url)
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        option = parse_qs(parts.query).get("starttls", ["auto"])[0]
        return cls(
            host=parts.hostname or "",
            port=parts.port or (465 if implicit else 587),
            implicit_tls=implicit,
            starttls=False if implicit else _STARTTLS[option],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        """The target without its password, for errors and logs."""
        scheme = "smtps" if self.implicit_tls else "smtp"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"
