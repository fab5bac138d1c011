"""Is a webhook URL one Tally may call?  Checked when an endpoint is created.

Outside development a URL must be https, and its host must resolve, and only to public
addresses: an endpoint pointing at loopback, a private network, link-local (the cloud
metadata service at 169.254.169.254) or another reserved range would let a customer make
Tally's servers call its internal services (SSRF).  In development (``TALLY_ENV``) http
and local addresses are allowed, so a receiver on the developer's machine works.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

from schemas.problem_types import (
    INSECURE_URL,
    INVALID_URL,
    PRIVATE_ADDRESS,
    UNRESOLVABLE_HOST,
)
from services.common.problems import invalid_field

FIELD = "body.url"
MAX_LENGTH = 2048
RESOLVE_TIMEOUT_SECONDS = 5.0


async def check(url: str, development: bool) -> str:
    """``url`` as it will be called, or the problem that refuses it."""
    parts = _parse(url)
    if parts.scheme != "https" and not development:
        raise invalid_field(FIELD, "must be an https URL", INSECURE_URL)
    host = parts.hostname or ""
    addresses = await _resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    if not development:
        for address in addresses:
            if not address.is_global:
                raise invalid_field(
                    FIELD, f"{host} resolves to {address}, a non-public address", PRIVATE_ADDRESS
                )
    return url


def _parse(url: str) -> SplitResult:
    if len(url) > MAX_LENGTH:
        raise invalid_field(FIELD, f"longer than {MAX_LENGTH} characters", INVALID_URL)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise invalid_field(FIELD, f"not a URL: {exc}", INVALID_URL) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid_field(FIELD, "not an http(s) URL with a host", INVALID_URL)
    if parts.username or parts.password or parts.fragment:
        raise invalid_field(FIELD, "must carry no credentials and no #fragment", INVALID_URL)
    return parts


async def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise invalid_field(FIELD, f"{host} does not resolve", UNRESOLVABLE_HOST) from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found]
