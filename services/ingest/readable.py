"""Refusing events a meter cannot read, before they are acknowledged.

An ``llm_call`` event without ``tokens.input`` would be counted nowhere by a meter of
``$.tokens.input``: silently, for ever.  Ingest knows the meters (its ``MeterCache``), so
such an event is refused with the meter and the path named, and its batch's other events
are accepted — the same per-event verdicts as any other invalid field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from schemas.catalog import Meter
from schemas.events import UsageEvent
from schemas.readings import Facts, Reader
from services.ingest.parsing import FieldError, Status, Verdict

Readers = dict[str, list[Reader]]


class MeterChecks:
    """The meters' readers by event type, compiled again only when the meters change."""

    def __init__(self) -> None:
        self._source: Mapping[str, list[Meter]] | None = None
        self._readers: Readers = {}

    def readers(self, by_type: Mapping[str, list[Meter]]) -> Readers:
        if by_type is not self._source:  # a reload replaces the index whole
            self._readers = {
                kind: [r for r in map(Reader.of, meters) if r.value_path is not None]
                for kind, meters in by_type.items()
            }
            self._source = by_type
        return self._readers

    def refuse_unreadable(
        self, verdicts: Sequence[Verdict], by_type: Mapping[str, list[Meter]]
    ) -> None:
        """Turn accepted verdicts whose event a meter cannot read into rejections."""
        readers = self.readers(by_type)
        if not readers:
            return
        for verdict in verdicts:
            event = verdict.event
            if verdict.status is not Status.ACCEPTED or event is None:
                continue
            errors = _unreadable(event, readers.get(event.type, ()))
            if errors:
                verdict.status, verdict.errors = Status.REJECTED, errors


def _unreadable(event: UsageEvent, readers: Sequence[Reader]) -> list[FieldError]:
    if not readers:
        return []
    facts = facts_of(event)
    errors = []
    for reader in readers:
        if why := reader.missing_number(facts):
            assert reader.value_path is not None
            errors.append(FieldError(f"data.{reader.value_path.name}", why))
    return errors


def facts_of(event: UsageEvent) -> Facts:
    data = event.data
    nested: dict[str, Any] | None = dict(data.__pydantic_extra__ or {}) if data.nested else None
    if nested is not None and "value" in data.model_fields_set:
        nested["value"] = data.value
    value: Decimal = data.value
    return Facts(nested, value, data.dimensions)
