"""OpenAPI components for routes that read their own bodies (FastAPI documents only
the bodies it parses itself)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def component_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """The models' JSON Schemas (and those they refer to), keyed by model name."""
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = top["$defs"]
    return schemas


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}
