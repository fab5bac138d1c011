from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas import jsonschema as export
from schemas.catalog import Catalog
from schemas.envelope import StoredEvent, encode, encode_shares
from schemas.events import UsageEvent
from tests.support import sample_event as event

COMMITTED = Path(export.__file__).with_suffix("")
REGENERATE = "JSON Schemas are out of date: run `python -m schemas.jsonschema`"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((COMMITTED / name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_committed_files_are_up_to_date() -> None:
    documents = export.documents()
    assert sorted(p.name for p in COMMITTED.glob("*.json")) == sorted(documents), REGENERATE
    for name, document in documents.items():
        assert (COMMITTED / name).read_text(encoding="utf-8") == export.render(document), (
            f"{name}: {REGENERATE}"
        )


def test_write(tmp_path: Path) -> None:
    written = export.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(export.documents())
    text = (tmp_path / "usage-event.schema.json").read_text(encoding="utf-8")
    assert text.endswith("}\n")
    document = json.loads(text)
    assert document["$id"] == "https://tally.dev/schemas/usage-event.schema.json"
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"


GOOD = [
    event(),
    event(data={"value": "0.000001"}),
    event(data={"value": "999999999999.999999"}),
    event(data={"value": "1.500000000"}),
    event(data={"value": 2.5, "status": 200, "cache": "hit"}),
    event(data={}),
    {k: v for k, v in event().items() if k != "data"},
    event(datacontenttype="application/json", traceparent="00-abc-01"),
    event(data={f"d{i}": "x" for i in range(32)}),
    event(data={"value": 0, **{f"d{i}": "x" for i in range(32)}}),
    event(data={"cached": True}),
    event(data={"endpoint": None}),
    event(data={"tokens": {"input": 812, "output": 96}, "model": "gpt-4o", "tags": ["a"]}),
]

BAD = [
    event(specversion="0.3"),
    event(subject="cust{42}"),
    event(subject="cust 42"),
    event(subject=""),
    event(id=""),
    event(data={"value": -1}),
    event(data={"value": 10**12}),
    event(data={"value": "1.0000001"}),
    event(data={"value": "-1"}),
    event(data={"value": "NaN"}),
    event(data={"value": True}),
    event(data={"value": None}),
    event(data={"Endpoint": "/v1/x"}),
    event(data={"endpoint": "x" * 257}),
    event(data={f"d{i}": "x" for i in range(33)}),
    {k: v for k, v in event().items() if k != "time"},
]


@pytest.mark.parametrize("raw", GOOD)
def test_schema_accepts_what_validation_accepts(raw: dict[str, Any]) -> None:
    UsageEvent.model_validate(raw)
    validator("usage-event.schema.json").validate(raw)


@pytest.mark.parametrize("raw", BAD)
def test_schema_rejects_what_validation_rejects(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(raw)
    assert not validator("usage-event.schema.json").is_valid(raw)


def test_batch_schema() -> None:
    batch = validator("usage-event-batch.schema.json")
    assert batch.is_valid(GOOD)
    assert not batch.is_valid([])
    assert not batch.is_valid([*GOOD, BAD[0]])
    assert not batch.is_valid(GOOD[0])
    assert not batch.is_valid([GOOD[0]] * 10_001)


def test_envelope_schema_describes_encode() -> None:
    received = datetime(2026, 11, 3, 10, 15, 31, tzinfo=UTC)
    events = [
        StoredEvent.from_usage(UsageEvent.model_validate(raw), received)
        for raw in [*GOOD, event(data={"value": "1e3"})]
    ]
    envelope = orjson.loads(encode("cust_42", events, received))
    validator("envelope.schema.json").validate(envelope)
    assert not validator("envelope.schema.json").is_valid({**envelope, "v": 2})
    envelope["events"][0]["value"] = float(Decimal(envelope["events"][0]["value"]))
    assert not validator("envelope.schema.json").is_valid(envelope)


def test_envelope_schema_describes_encode_shares() -> None:
    received = datetime(2026, 11, 3, 10, 15, 31, tzinfo=UTC)
    events = [StoredEvent.from_usage(UsageEvent.model_validate(raw), received) for raw in GOOD]
    shared = orjson.loads(encode_shares([("cust_1", events), ("cust_2", events)], received))
    validator("envelope.schema.json").validate(shared)
    assert not validator("envelope.schema.json").is_valid({**shared, "v": 1})
    del shared["shares"][1]["customer"]
    assert not validator("envelope.schema.json").is_valid(shared)


def test_catalog_schema_accepts_the_default_catalog() -> None:
    catalog = Catalog.default().model_dump(mode="json")
    validator("catalog.schema.json").validate(catalog)
    catalog["meters"][0]["aggregation"] = "median"
    assert not validator("catalog.schema.json").is_valid(catalog)
