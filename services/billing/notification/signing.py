"""Standard Webhooks signatures: what lets a receiver trust a webhook came from Tally.

Each endpoint has its own secret ``whsec_<base64 of 32 random bytes>``.  A request carries
``webhook-id`` (the notification id: the same on every retry, the receiver's
de-duplication key), ``webhook-timestamp`` (unix seconds of this attempt: receivers reject
anything more than 5 minutes off) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256>``
over ``{id}.{timestamp}.{body}``, once per secret that is valid now, space-separated, so
that a receiver holding either the old or the new secret during a rotation verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(PREFIX))


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets_now: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers, signed with every secret valid now."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets_now),
    }
