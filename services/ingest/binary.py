"""CloudEvents over HTTP in binary mode, and ``data_base64`` in structured mode.

Binary mode (CloudEvents HTTP binding, section 3.1) carries the attributes in ``ce-*``
headers and ``data`` as the body; emitters built on the CloudEvents SDKs send it by
default.  Both are turned here into the structured JSON object ``/v1/events`` validates,
so they take exactly the same validation, de-duplication and dead-letter path; only the
names in the errors change back to what the client sent (``ce-id``, ``data_base64``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import jiter

from schemas.problem_types import MALFORMED_JSON, UNSUPPORTED_MEDIA_TYPE
from services.common.bodies import is_json
from services.common.problems import Problem, invalid_field

PREFIX = "ce-"


def is_binary(headers: Mapping[str, str]) -> bool:
    """Binary mode is recognised by its one mandatory header (binding, section 3.1); a
    CloudEvents media type says structured mode, whatever the headers (section 3)."""
    kind = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    return "ce-specversion" in headers and not kind.startswith("application/cloudevents")


def binary_event(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The structured event a binary-mode request stands for: every ``ce-*`` header
    (percent-decoded, as the binding asks) an attribute, the body its ``data``.  A header
    given twice is refused, not settled by order (Starlette's ``items()`` lists each
    copy)."""
    event: dict[str, Any] = {}
    for name, value in headers.items():
        name = name.lower()
        if not name.startswith(PREFIX):
            continue
        attribute = name[len(PREFIX) :]
        if attribute in event:
            raise invalid_field(name, "is given twice; an attribute has one value")
        event[attribute] = _percent_decoded(name, value)
    content_type = headers.get("content-type")
    if not is_json(content_type):
        raise Problem(
            UNSUPPORTED_MEDIA_TYPE,
            f"binary mode: the data's Content-Type {content_type or '(none)'!r} is not"
            " accepted; send the data as application/json (a JSON object)",
        )
    event["datacontenttype"] = "application/json"
    if body.strip():
        try:
            event["data"] = jiter.from_json(body, float_mode="decimal")
        except ValueError as exc:
            raise Problem(
                MALFORMED_JSON, f"binary mode: the body is not valid JSON: {exc}"
            ) from exc
    return event


def _percent_decoded(name: str, value: str) -> str:
    """A header's value percent-decoded as UTF-8.  Bytes that are not UTF-8 are refused
    rather than replaced: replaced, ``%FE`` and ``%FF`` would both read as U+FFFD and two
    events with different ids would be counted as one (a ``%`` not followed by two hex
    digits stays as written, as ``unquote`` leaves it)."""
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise invalid_field(
            name, "is not percent-encoded UTF-8 (CloudEvents HTTP binding, section 3.1.3.2)"
        ) from None


def header_name(field: str) -> str:
    """An error's field as the binary-mode client named it: ``id`` → ``ce-id``;
    ``data.value`` stays (the body is the data)."""
    if not field or field.startswith("data"):
        return field
    return PREFIX + field


def decoded(raw: dict[str, Any]) -> dict[str, Any] | tuple[str, str]:
    """A structured event with ``data_base64`` as one with ``data``, or the field and
    reason it cannot be: the data must be JSON to be metered."""
    encoded = raw["data_base64"]
    if "data" in raw:
        return "data_base64", "must not be sent together with data (CloudEvents JSON format)"
    content_type = raw.get("datacontenttype")
    if content_type is not None and not (isinstance(content_type, str) and is_json(content_type)):
        return "data_base64", (
            f"carries {content_type!r} data; only JSON data can be metered (datacontenttype"
            " application/json)"
        )
    if not isinstance(encoded, str):
        return "data_base64", "must be a base64 string"
    try:
        data = jiter.from_json(base64.b64decode(encoded, validate=True), float_mode="decimal")
    except (binascii.Error, ValueError) as exc:
        return "data_base64", f"is not base64 of a JSON document: {exc}"
    event = {k: v for k, v in raw.items() if k != "data_base64"}
    event["data"] = data
    if content_type is not None:
        event["datacontenttype"] = "application/json"
    return event
