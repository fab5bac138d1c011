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
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

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

_dimension_name = re.compile(DIMENSION_NAME_PATTERN)
_valid_names: set[str] = set()  # names already checked; they repeat on every event


def _utc(moment: datetime) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the range of representable times") from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
NonEmpty = Annotated[str, Field(min_length=1, max_length=256, pattern=PRINTABLE_PATTERN)]
CustomerId = Annotated[str, Field(pattern=CUSTOMER_ID_PATTERN)]
"""A customer's id, wherever a body names one (paths use the same pattern)."""

# What a JSON emitter may send as ``value`` when it sends a string: up to 12 integer
# digits and 6 decimal places (trailing zeros beyond are harmless).  Validation itself
# accepts any string Decimal parses; this is the documented, portable subset.
VALUE_STRING_PATTERN = r"^0*[0-9]{1,12}(\.[0-9]{0,6}0*)?$"


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
        "description": "A dimension; numbers are stored as strings.",
        "type": ["string", "number"],
        "maxLength": MAX_DIMENSION_LENGTH,
        "pattern": PRINTABLE_PATTERN,
    }
    # ``value`` plus at most MAX_DIMENSIONS dimensions.
    schema["if"] = {"required": ["value"]}
    schema["then"] = {"maxProperties": MAX_DIMENSIONS + 1}
    schema["else"] = {"maxProperties": MAX_DIMENSIONS}


Dimension = Annotated[
    str, StringConstraints(max_length=MAX_DIMENSION_LENGTH, pattern=PRINTABLE_PATTERN)
]


class EventData(BaseModel):
    """The payload: a decimal ``value`` plus string dimensions (endpoint, method, status…).

    Dimensions are the remaining keys of ``data``.  Numbers given as dimensions are
    turned into strings (``"status": 200`` becomes ``"200"``); booleans, nested objects
    and arrays are refused, because a meter can only group by a flat string.  Every
    check but the dimension names runs inside pydantic-core: ingest validates tens of
    thousands of these a second.
    """

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        coerce_numbers_to_str=True,
        json_schema_extra=_event_data_schema,
    )
    __pydantic_extra__: dict[str, Dimension] = Field(init=False)

    value: Annotated[
        Decimal, Field(ge=0, lt=MAX_VALUE, decimal_places=VALUE_DECIMALS, allow_inf_nan=False)
    ] = Decimal(1)

    @model_validator(mode="after")
    def _dimension_names(self) -> EventData:
        extra = self.__pydantic_extra__ or {}
        if len(extra) > MAX_DIMENSIONS:
            raise ValueError(f"at most {MAX_DIMENSIONS} dimensions are allowed")
        for name in extra:
            if name not in _valid_names:
                if not _dimension_name.fullmatch(name):
                    why = control_character(name) or f"must match {DIMENSION_NAME_PATTERN}"
                    raise ValueError(f"dimension name {name!r} {why}")
                if len(_valid_names) < 10_000:
                    _valid_names.add(name)
        return self

    @property
    def dimensions(self) -> dict[str, str]:
        return dict(self.__pydantic_extra__ or {})


class UsageEvent(BaseModel):
    """A CloudEvents 1.0 usage event in structured JSON mode."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: NonEmpty
    source: NonEmpty
    type: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
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


def to_micros(value: Decimal) -> int:
    """The exact integer of micro-units Redis counters hold for ``value``."""
    return int(value.scaleb(VALUE_DECIMALS))


def from_micros(micros: int) -> Decimal:
    whole, rest = divmod(micros, VALUE_SCALE)
    if not rest:  # most counters (counts): a third of the cost of the general case
        return Decimal(whole)
    return Decimal(micros).scaleb(-VALUE_DECIMALS).normalize() + Decimal(0)


def utcnow() -> datetime:
    return datetime.now(UTC)
