"""A notification as an email: a subject, a plain-text body and an HTML body, from the
Jinja2 templates in ``templates/`` (``<type>.txt`` holds the subject block and the text,
``<type>.html`` the HTML; HTML is autoescaped, so a company named ``<script>`` is text).

Templates are strict: a payload missing a key the template needs is a ``RenderError``
naming it, not an email with a blank where the number should be.  Retrying cannot fix
that, so the mailer reports it as a permanent failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any

from jinja2 import (
    Environment,
    PackageLoader,
    StrictUndefined,
    TemplateError,
    Undefined,
    select_autoescape,
)

from schemas.events import utcnow
from schemas.notifications import Notification
from services.billing.notification.email.formats import FILTERS
from services.billing.notification.email.links import Links

ENV = Environment(
    loader=PackageLoader("services.billing.notification.email", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def _strict(fmt: Callable[..., str]) -> Callable[..., str]:
    """A format that first insists its arguments are there: a missing payload key then
    fails naming the key, not as "not a number: Undefined"."""

    def checked(*args: Any) -> str:
        for arg in args:
            if isinstance(arg, Undefined):
                str(arg)  # StrictUndefined raises UndefinedError, naming the key
        return fmt(*args)

    return checked


ENV.filters.update({name: _strict(fmt) for name, fmt in FILTERS.items()})

CHANGE_SOURCES = {
    "admin": "by the seller",
    "stripe": "through your Stripe subscription",
    "self": "by you",
    "trial_end": "because your trial ended",
    "past_due": "because a payment failed",
}
"""Who changed a plan (``plan.changed``'s ``source``), as a sentence reads it."""


def _change_source(source: str) -> str:
    return CHANGE_SOURCES.get(source, f"({source})")


ENV.filters["change_source"] = _change_source


class RenderError(ValueError):
    """The payload does not have what the type's template says."""


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


def render(notification: Notification, links: Links, company: str | None = None) -> Rendered:
    """The three parts of the email telling ``notification`` (``company`` greets the
    reader by name; without it, by customer id)."""
    context: dict[str, Any] = {
        "n": notification,
        "data": notification.data,
        "customer": notification.customer,
        "company": company or notification.customer,
        "links": links,
        "upgrade_to": notification.data.get("upgrade_to"),
    }
    kind = notification.type.value
    try:
        text = ENV.get_template(f"{kind}.txt")
        subject = " ".join("".join(text.blocks["subject"](text.new_context(context))).split())
        context["subject"] = subject
        return Rendered(
            subject, text.render(context), ENV.get_template(f"{kind}.html").render(context)
        )
    except (TemplateError, ValueError, KeyError, TypeError) as exc:
        raise RenderError(f"cannot render {kind} {notification.id}: {exc}") from exc


def message(
    notification: Notification,
    to: str,
    sender: str,
    links: Links,
    company: str | None = None,
    now: datetime | None = None,
) -> EmailMessage:
    """The multipart/alternative message for one recipient.  Its ``Message-ID`` is the
    notification id at the sender's domain, so a resend is recognisably the same mail."""
    rendered = render(notification, links, company)
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    mail = EmailMessage(policy=policy.SMTP)
    mail["Subject"] = rendered.subject
    mail["From"] = sender
    mail["To"] = Address(addr_spec=to)
    mail["Date"] = format_datetime(now or utcnow())
    mail["Message-ID"] = f"<{notification.id}@{domain}>"
    mail["X-Tally-Notification-Id"] = notification.id
    mail["X-Tally-Notification-Type"] = notification.type.value
    mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies, please
    # quoted-printable keeps the message 7-bit: any server takes it, 8BITMIME or not
    mail.set_content(rendered.text, cte="quoted-printable")
    mail.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    return mail
