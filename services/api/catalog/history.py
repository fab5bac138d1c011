"""A catalog entry's history, as the admin API answers it: every version of a plan or a
meter with who saved it and when (``plan_versions``, ``meter_versions``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class Version(BaseModel):
    version: int
    definition: dict[str, Any] = Field(description="The plan or meter as it was saved.")
    changed_by: str
    changed_at: datetime


class History(BaseModel):
    versions: list[Version]


def history(rows: Sequence[tuple[Any, ...]]) -> History:
    """Rows of (version, definition, changed_by, changed_at), oldest first."""
    return History(
        versions=[
            Version(version=v, definition=d, changed_by=by, changed_at=at) for v, d, by, at in rows
        ]
    )
