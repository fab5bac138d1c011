"""The usage event: one CloudEvents 1.0 JSON object per billable thing.

The idempotency key is (``source``, ``id``).  Event time travels in ``time``; the Kafka
record timestamp is never trusted for it.  ``data.value`` is a decimal with at most
``VALUE_DECIMALS`` places so that every aggregate can be kept as an exact integer of
micro-units in Redis and as ``Decimal(38, 6)`` in ClickHouse.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeGuard

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StringConstraints,
    model_validator,
)

from schemas import paths
from schemas.corrections import RESERVED_TYPE_PREFIX
from schemas.date_times import RFC3339
from schemas.text import PRINTABLE_PATTERN, control_character

VALUE_DECIMALS = 6
VALUE_SCALE: int = 10**VALUE_DECIMALS
MAX_VALUE = Decimal(10) ** 12
CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
LEASE_ID_PATTERN = r"^ls_[A-Za-z0-9_-]{16}$"
"""A lease's id (``POST /v1/leases``), as usage events spent under it name it."""
DIMENSION_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
MAX_DIMENSION_LENGTH = 256
MAX_DIMENSIONS = 32
MAX_DEPTH = 8
"""Levels of objects and arrays ``data`` may nest (``data`` itself is level 1): a meter's
path has at most ``schemas.paths.MAX_STEPS`` steps, so deeper values could never count."""
MAX_NODES = 1000
"""Keys, array items and values in all of ``data``: an event describes one billable thing."""
MAX_KEY_LENGTH = 64

_dimension_name = re.compile(DIMENSION_NAME_PATTERN)
_valid_names: set[str] = set()  # names already checked; they repeat on every event


def _utc(moment: datetime) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the range of representable times") from None


UtcDatetime = Annotated[AwareDatetime, RFC3339, AfterValidator(_utc)]
"""A time a client sends: RFC 3339 text with an offset (a number is refused, not read as
seconds since 1970), kept in UTC."""
NonEmpty = Annotated[str, Field(min_length=1, max_length=256, pattern=PRINTABLE_PATTERN)]
CustomerId = Annotated[str, Field(pattern=CUSTOMER_ID_PATTERN)]
"""A customer's id, wherever a body names one (paths use the same pattern)."""

# What a JSON emitter may send as ``value`` when it sends a string: up to 12 integer
# digits and 6 decimal places (trailing zeros beyond are harmless).  Validation itself
# also takes a sign and an exponent (``DECIMAL_TEXT``); this is the documented, portable
# subset.
VALUE_STRING_PATTERN = r"^0*[0-9]{1,12}(\.[0-9]{0,6}0*)?$"
DECIMAL_TEXT = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?", re.ASCII)
"""A decimal as text: ASCII digits, a point, an exponent, as JSON writes a number (leading
zeros and a bare trailing point allowed, as ``VALUE_STRING_PATTERN`` documents)."""


_NOT_FINITE = frozenset({"nan", "snan", "inf", "infinity"})


def _decimal_text(given: object) -> object:
    """A decimal sent as text must read as JSON writes a number: Python's ``Decimal``
    also takes ``"1_000"``, ``" 1 "``, ``"+1"`` and other scripts' digits (Arabic-Indic ten),
    which another client's parser would refuse or read otherwise, so the value would
    depend on who read it."""
    if (
        isinstance(given, str)
        and not DECIMAL_TEXT.fullmatch(given)
        and given.lstrip("+-").lower() not in _NOT_FINITE  # pydantic names these itself
    ):
        raise ValueError(
            "must be a number as JSON writes one: ASCII digits, a point, an exponent"
            " (no '_', spaces or '+')"
        )
    return given


DecimalText = BeforeValidator(_decimal_text)
"""For ``Annotated[Decimal, DecimalText]``: a decimal a client sends, as text or number."""


def _event_data_schema(schema: dict[str, Any]) -> None:
    """Document in JSON Schema what ``EventData``'s validators enforce."""
    schema["properties"]["value"] = {
        "title": "Value",
        "description": (
            f"A non-negative decimal below 10^12 with at most {VALUE_DECIMALS} decimal "
            "places, as a JSON number or a numeric string (a string keeps every digit)."
        ),
        "default": 1,
        "anyOf": [
            {"type": "number", "minimum": 0, "exclusiveMaximum": int(MAX_VALUE)},
            {"type": "string", "pattern": VALUE_STRING_PATTERN},
        ],
    }
    schema["propertyNames"] = {"pattern": DIMENSION_NAME_PATTERN}
    schema["additionalProperties"] = {
        "description": (
            "A dimension (a string; numbers are stored as strings), or nested data: objects"
            f" and arrays up to {MAX_DEPTH} levels deep and {MAX_NODES} nodes in all, which"
            " meters read by path (`$.tokens.input`)."
        ),
        "anyOf": [
            {
                "type": ["string", "number"],
                "maxLength": MAX_DIMENSION_LENGTH,
                "pattern": PRINTABLE_PATTERN,
            },
            {"type": ["object", "array", "boolean", "null"]},
        ],
    }
    # ``value`` plus at most MAX_DIMENSIONS dimensions.
    schema["if"] = {"required": ["value"]}
    schema["then"] = {"maxProperties": MAX_DIMENSIONS + 1}
    schema["else"] = {"maxProperties": MAX_DIMENSIONS}


Dimension = Annotated[
    str, StringConstraints(max_length=MAX_DIMENSION_LENGTH, pattern=PRINTABLE_PATTERN)
]


class EventData(BaseModel):
    """The payload: a decimal ``value``, string dimensions (endpoint, method, status…) and
    any nested data (``"tokens": {"input": 812, "output": 96}``) that meters read by path.

    Dimensions are the remaining top-level strings of ``data``.  Numbers given there are
    turned into strings (``"status": 200`` becomes ``"200"``).  Objects, arrays, booleans
    and null are kept as sent, bounded in depth, size and key length, and checked only
    when present: ingest validates tens of thousands of flat events a second, and every
    check of a flat one but the dimension names runs inside pydantic-core.
    """

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        coerce_numbers_to_str=True,
        json_schema_extra=_event_data_schema,
    )
    # Dimensions once validated; nested members join them after (``_split_nested``).
    __pydantic_extra__: dict[str, Dimension] = Field(init=False)

    value: Annotated[
        Decimal,
        Field(ge=0, lt=MAX_VALUE, decimal_places=VALUE_DECIMALS, allow_inf_nan=False),
        DecimalText,  # after the constraints, so that pydantic-core checks them itself
    ] = Decimal(1)

    @model_validator(mode="wrap")
    @classmethod
    def _split_nested(cls, given: Any, flat: ModelWrapValidatorHandler[EventData]) -> EventData:
        """Validate dimensions in pydantic-core as before nested data existed, and only
        then check and add the nested members: a flat event pays one scan of its values'
        types, in C.  The dimension names are checked here too, not in a validator of
        their own: one call into Python per event, not two."""
        if not isinstance(given, dict) or _NESTED_OR_NULL.isdisjoint(map(type, given.values())):
            return _named(flat(given))  # flat: ``value`` and dimensions only
        nested = {k: v for k, v in given.items() if k != "value" and type(v) in _NESTED_OR_NULL}
        if not nested:
            return _named(flat(given))
        model = _named(flat({k: v for k, v in given.items() if k not in nested}))
        _check_names(nested)
        _Bounds().check(list(nested.items()))
        extra: dict[str, Any] = model.__pydantic_extra__ or {}
        if len(extra) + len(nested) > MAX_DIMENSIONS:
            raise ValueError(f"at most {MAX_DIMENSIONS} dimensions are allowed")
        merged = {k: nested[k] if k in nested else extra[k] for k in given if k != "value"}
        object.__setattr__(model, "__pydantic_extra__", merged)
        return model

    @property
    def dimensions(self) -> dict[str, str]:
        """The top-level strings: what flat meters group by and ClickHouse keeps as a map."""
        extra = self.__pydantic_extra__ or {}
        return {k: v for k, v in extra.items() if type(v) is str}

    @property
    def nested(self) -> bool:
        """Does ``data`` hold more than ``value`` and dimensions?"""
        return not _flat(self.__pydantic_extra__ or {})

    def wire(self) -> tuple[dict[str, str], str]:
        """``(dimensions, as_json())``, as an envelope carries them, with one scan of
        the members for a flat event (the common case).  A flat event's dimensions are
        its extra members themselves, not a copy: read them, do not change them."""
        extra = self.__pydantic_extra__ or {}
        if _flat(extra):
            return extra, ""
        return self.dimensions, self._nested_json()

    def as_json(self) -> str:
        """``data`` as JSON text when it holds nested members, else ``""`` (a flat event's
        data is its ``value`` and ``dimensions``)."""
        return self._nested_json() if self.nested else ""

    def _nested_json(self) -> str:
        """Numbers stay exact: ingest parses them as decimals and they are written back
        as the same JSON numbers."""
        body: dict[str, Any] = dict(self.__pydantic_extra__ or {})
        if "value" in self.model_fields_set:
            body = {"value": self.value, **body}
        return orjson.dumps(body, default=_exact_number).decode()


_NESTED_OR_NULL = frozenset({dict, list, bool, type(None)})
"""Exact types of the members of ``data`` kept as sent (what a JSON parser makes)."""
_TEXT = frozenset({str})


def _flat(members: dict[str, Any]) -> bool:
    """Are all of ``data``'s members dimensions (exactly ``str`` once validated)?  One C
    call: this runs for every event ingest accepts."""
    return _TEXT.issuperset(map(type, members.values()))


def _named(model: EventData) -> EventData:
    """``model`` once its dimensions are within bounds in number and name."""
    extra = model.__pydantic_extra__ or {}
    if len(extra) > MAX_DIMENSIONS:
        raise ValueError(f"at most {MAX_DIMENSIONS} dimensions are allowed")
    _check_names(extra)
    return model


def _check_names(members: dict[str, Any]) -> None:
    if _valid_names.issuperset(members):  # the common case, in one call
        return
    for name in members:
        if name not in _valid_names:
            if not _dimension_name.fullmatch(name):
                why = control_character(name) or f"must match {DIMENSION_NAME_PATTERN}"
                raise ValueError(f"dimension name {name!r} {why}")
            if len(_valid_names) < 10_000:
                _valid_names.add(name)


class _Bounds:
    """Walks nested data once, counting nodes; raises ``ValueError`` naming where a bound
    is exceeded (pydantic reports it under ``data``)."""

    def __init__(self) -> None:
        self.nodes = 0

    def check(self, members: list[tuple[str, Any]]) -> None:
        for name, value in members:
            self._walk(value, name, 2)

    def _walk(self, value: Any, where: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValueError(f"holds more than {MAX_NODES} keys and values in all")
        if isinstance(value, dict):
            self._level(where, depth)
            for key, item in value.items():
                self._key(key, where)
                self._walk(item, f"{where}.{key}", depth + 1)
        elif isinstance(value, list):
            self._level(where, depth)
            for index, item in enumerate(value):
                self._walk(item, f"{where}[{index}]", depth + 1)
        elif isinstance(value, str):
            if len(value) > MAX_DIMENSION_LENGTH:
                raise ValueError(f"{where}: strings are at most {MAX_DIMENSION_LENGTH} characters")
            if why := control_character(value):
                raise ValueError(f"{where}: {why}")
        elif isinstance(value, Decimal | float) and not _finite(value):
            raise ValueError(f"{where}: numbers must be finite")
        elif _number(value) and (why := paths.exact_as_json(value)):
            raise ValueError(f"{where}: {value} {why}")

    @staticmethod
    def _level(where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")

    @staticmethod
    def _key(key: str, where: str) -> None:
        if not key or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"{where}: keys are 1 to {MAX_KEY_LENGTH} characters")
        if why := control_character(key):
            raise ValueError(f"{where}: key {key!r} {why}")


def _exact_number(number: Any) -> orjson.Fragment:
    if isinstance(number, Decimal):
        return orjson.Fragment(str(number))
    raise TypeError(f"{type(number).__name__} is not JSON")


def _number(value: Any) -> TypeGuard[int | Decimal]:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def _finite(number: Decimal | float) -> bool:
    return (
        number.is_finite()
        if isinstance(number, Decimal)
        else number == number and abs(number) != float("inf")
    )


def _not_reserved(kind: str) -> str:
    """Refuse Tally's own event types: a correction sent as an event would bypass the
    corrections API's checks and audit."""
    if kind.startswith(RESERVED_TYPE_PREFIX):
        raise ValueError(
            f"types starting with {RESERVED_TYPE_PREFIX!r} are Tally's own;"
            " corrections go to POST /v1/customers/{customer}/usage/corrections"
        )
    return kind


class UsageEvent(BaseModel):
    """A CloudEvents 1.0 usage event in structured JSON mode."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: NonEmpty
    source: NonEmpty
    type: Annotated[
        str,
        Field(
            min_length=1,
            max_length=128,
            pattern=r"^[A-Za-z0-9._:-]+$",
            description="What happened; types starting with `tally.` are Tally's own.",
        ),
        AfterValidator(_not_reserved),
    ]
    subject: CustomerId = Field(description="The customer the usage belongs to.")
    time: UtcDatetime
    datacontenttype: Literal["application/json"] | None = None
    data: EventData = Field(default_factory=EventData)
    tallylease: Annotated[str | None, Field(pattern=LEASE_ID_PATTERN)] = Field(
        None,
        description=(
            "A CloudEvents extension attribute: the lease (POST /v1/leases) this usage was"
            " spent under.  Counting the event settles that much of the lease."
        ),
    )

    @property
    def key(self) -> tuple[str, str]:
        """The idempotency key."""
        return (self.source, self.id)

    @property
    def customer(self) -> str:
        return self.subject

    @property
    def value(self) -> Decimal:
        return self.data.value

    @property
    def dimensions(self) -> dict[str, str]:
        return self.data.dimensions

    @property
    def lease(self) -> str:
        return self.tallylease or ""

    def wire(self) -> tuple[dict[str, str], str]:
        return self.data.wire()


def to_micros(value: Decimal) -> int:
    """The exact integer of micro-units Redis counters hold for ``value``."""
    return int(value.scaleb(VALUE_DECIMALS))


def from_micros(micros: int) -> Decimal:
    whole, rest = divmod(micros, VALUE_SCALE)
    if not rest:  # most counters (counts): a third of the cost of the general case
        return Decimal(whole)
    return Decimal(micros).scaleb(-VALUE_DECIMALS).normalize() + Decimal(0)


def micros_text(micros: int) -> str:
    """``str(from_micros(micros))``; a whole number without making a ``Decimal``."""
    whole, rest = divmod(micros, VALUE_SCALE)
    return str(whole) if not rest else str(from_micros(micros))


def utcnow() -> datetime:
    return datetime.now(UTC)
