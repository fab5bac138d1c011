"""JSON Schemas of Tally's wire formats, for emitters and consumers not written in Python.

The schemas are generated from the pydantic models and committed under
``schemas/jsonschema/``; a test fails when they fall behind.  Regenerate them with::

    python -m schemas.jsonschema
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from schemas.catalog import Catalog
from schemas.envelope import MAX_EVENTS_PER_ENVELOPE
from schemas.events import UsageEvent

BASE_URI = "https://tally.dev/schemas/"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
DIRECTORY = Path(__file__).with_suffix("")  # schemas/jsonschema/

# The ingest default (``TALLY_MAX_BATCH_EVENTS``); a deployment may lower or raise it.
MAX_BATCH_EVENTS = 10_000

# ``str(Decimal)``: plain digits, or scientific notation such as ``1E+3``.
_DECIMAL_STRING = r"^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$"


class EnvelopeEvent(BaseModel):
    """One event inside an envelope; its customer is its share's (or the envelope's)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    type: str
    time: AwareDatetime = Field(description="Event time, RFC 3339 with offset.")
    value: Annotated[str, Field(pattern=_DECIMAL_STRING)] = Field(
        description="The exact decimal value as a string."
    )
    dims: dict[str, str] = Field(description="The event's dimensions.")
    lease: str | None = Field(None, description="The lease it was spent under (tallylease).")
    data: str | None = Field(
        None,
        description="The event's data as sent, as JSON text, when it holds nested members"
        " (absent for flat data: `value` and `dims` are all of it).",
    )


class SingleCustomerEnvelope(BaseModel):
    """Version 1 of a Kafka record on ``tally.events``: one customer's events from one
    request (still read; no longer written)."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = Field(description="The envelope format version.")
    customer: str
    received_at: AwareDatetime = Field(description="When ingest accepted the events.")
    events: Annotated[list[EnvelopeEvent], Field(max_length=MAX_EVENTS_PER_ENVELOPE)]


class Share(BaseModel):
    """One customer's events in an envelope."""

    model_config = ConfigDict(extra="forbid")

    customer: str
    events: list[EnvelopeEvent]


class SharedEnvelope(BaseModel):
    """Version 2 (ENVELOPE_VERSION) of a Kafka record on ``tally.events``: the events of
    one request's customers that hash to the record's partition, by customer; at most
    MAX_EVENTS_PER_ENVELOPE events in all."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[2] = Field(description="The envelope format version (ENVELOPE_VERSION).")
    received_at: AwareDatetime = Field(description="When ingest accepted the events.")
    cv: int | None = Field(
        None,
        ge=1,
        description="The meter catalog version ingest held (absent: 0). A meter created at"
        " version v counts live only events stamped v or later; older ones are back-filled.",
    )
    shares: list[Share]


_Envelope = TypeAdapter(
    Annotated[
        SingleCustomerEnvelope | SharedEnvelope,
        Field(
            discriminator="v",
            title="Envelope",
            description="A Kafka record on tally.events (schemas/envelope.py).",
        ),
    ]
)


_Batch = TypeAdapter(
    Annotated[
        list[UsageEvent],
        Field(
            min_length=1,
            max_length=MAX_BATCH_EVENTS,
            title="UsageEventBatch",
            description="A batch of usage events (application/cloudevents-batch+json).",
        ),
    ]
)


def _identified(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": DIALECT, "$id": BASE_URI + name, **schema}


def documents() -> dict[str, dict[str, Any]]:
    """Every JSON Schema document, keyed by its file name."""
    return {
        name: _identified(name, schema)
        for name, schema in {
            "usage-event.schema.json": UsageEvent.model_json_schema(),
            "usage-event-batch.schema.json": _Batch.json_schema(),
            "envelope.schema.json": _Envelope.json_schema(),
            "catalog.schema.json": Catalog.model_json_schema(),
        }.items()
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(directory: Path = DIRECTORY) -> list[Path]:
    """Write every document into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in documents().items():
        path = directory / name
        path.write_text(render(document), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
