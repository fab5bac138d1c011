"""The email channel: notifications rendered from Jinja2 templates (plain text and HTML)
and sent by SMTP (``TALLY_SMTP_URL``) with aiosmtplib.

``build_mailer(settings)`` is what the delivery worker is given (``None``: no email);
``SmtpMailer.send`` answers every send with an ``Attempt``: what a server or a payload
does to it is never an exception.
"""

from services.billing.notification.email.mailer import SmtpMailer, build_mailer
from services.billing.notification.email.render import Rendered, message, render

__all__ = ["Rendered", "SmtpMailer", "build_mailer", "message", "render"]
