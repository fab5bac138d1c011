"""Query strings read whole: each parameter given once.

Starlette and FastAPI keep the last of a repeated parameter (``?limit=5&limit=500``):
which one the caller meant cannot be known, so it is refused, named, as an unknown one is.
"""

from __future__ import annotations

from starlette.requests import Request

from schemas.problem_types import INVALID_REQUEST, ProblemType
from services.common.problems import invalid_field


def single_values(request: Request, kind: ProblemType = INVALID_REQUEST) -> dict[str, str]:
    """The query's parameters by name; 422 naming the first one given more than once."""
    items = request.query_params.multi_items()
    values = dict(items)
    if len(values) != len(items):
        seen: set[str] = set()
        for name, _ in items:
            if name in seen:
                raise invalid_field(f"query.{name}", "given more than once; send it once", kind)
            seen.add(name)
    return values
