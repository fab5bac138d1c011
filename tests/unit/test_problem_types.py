"""The problem types a client can meet are the registry's, and the docs list exactly them."""

from __future__ import annotations

import re
from pathlib import Path

from schemas.problem_types import REGISTRY, ProblemType

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROW = re.compile(r"^\| `([a-z-]+)` \| (\d{3}) \| ([^|]+?) \|$")


def documented() -> dict[str, ProblemType]:
    table = DOCS.read_text().split("| type | status | title |", 1)[1]
    rows = [ROW.match(line) for line in table.strip().splitlines()[1:]]
    found = {}
    for row in rows:
        if row is None:
            break
        found[row[1]] = ProblemType(row[1], int(row[2]), row[3])
    return found


def test_the_docs_table_is_the_registry() -> None:
    docs = documented()
    assert sorted(docs) == sorted(REGISTRY), "docs/api.md's table and the registry differ"
    for slug, kind in REGISTRY.items():
        assert docs[slug] == kind, f"{slug}: docs say {docs[slug]}, the registry {kind}"


def test_slugs_are_urls_and_statuses_errors() -> None:
    for kind in REGISTRY.values():
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", kind.slug)
        assert 400 <= kind.status < 600
        assert kind.uri == f"https://tally.dev/problems/{kind.slug}"


def test_no_service_builds_a_problem_outside_the_registry() -> None:
    """A ``Problem`` takes a registered type; a literal status or slug would not type-check,
    and none is left in the source."""
    root = Path(__file__).resolve().parents[2] / "services"
    literal = re.compile(r"Problem\(\s*\d{3}\s*,")
    offenders = [str(p) for p in root.rglob("*.py") if literal.search(p.read_text())]
    assert offenders == []
