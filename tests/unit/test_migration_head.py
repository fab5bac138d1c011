"""``postgres.head_revision``: the migrations' head read from the scripts without
Alembic, so that a start on a database already at the head skips Alembic entirely."""

from __future__ import annotations

from pathlib import Path

from alembic.script import ScriptDirectory

from services.common import postgres


def script(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(f'"""{name}"""\n\nfrom alembic import op\n\n{body}\n')


def test_the_head_is_alembics() -> None:
    alembic = ScriptDirectory(str(postgres.MIGRATIONS)).get_current_head()
    assert postgres.head_revision() == alembic


def test_a_merge_is_the_one_head(tmp_path: Path) -> None:
    script(tmp_path, "a", 'revision = "a"\ndown_revision = None')
    script(tmp_path, "b", 'revision: str = "b"\ndown_revision: str | None = "a"')
    script(tmp_path, "c", 'revision = "c"\ndown_revision = "a"')
    assert postgres.head_revision(tmp_path) is None  # two heads: Alembic decides
    script(tmp_path, "d", 'revision = "d"\ndown_revision = ("b", "c")')
    assert postgres.head_revision(tmp_path) == "d"


def test_a_script_it_cannot_read_leaves_it_to_alembic(tmp_path: Path) -> None:
    script(tmp_path, "a", 'revision = "a"\ndown_revision = None')
    script(tmp_path, "b", 'revision = "b"\ndown_revision = PREVIOUS')
    assert postgres.head_revision(tmp_path) is None
    script(tmp_path, "b", 'down_revision = "a"')  # no revision at all
    assert postgres.head_revision(tmp_path) is None
    assert postgres.head_revision(tmp_path / "missing") is None
