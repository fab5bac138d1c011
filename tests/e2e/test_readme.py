"""The README's tour, run as a reader would run it: every ```sh block of README.md, in
order, in one bash session (so a value one block captures, such as the API key, is there
for the next), against a real `tally up` on its embedded defaults and development tokens.

A block that cannot run here says why in an HTML comment on the line right before its
fence, ``<!-- not run: reason -->``; every other ```sh block runs, and a shell example
fenced under another name (```bash, ```console…) fails the test, so none escapes it.
The only changes made to a block are the base URL (the README says
``http://127.0.0.1:8000``; the test's Tally listens on a free port) and the database and
Redis db, which are the test's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from tests.conftest import ADMIN_URL, REDIS_URL
from tests.support import TallyProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
BASE_URL = "http://127.0.0.1:8000"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->")
FENCE = re.compile(r"^```(?P<info>[^`]*)$")
OTHER_SHELLS = {"bash", "shell", "console", "zsh", "shell-session", "terminal"}
MARK = "::readme-block::"
# What a reader's environment must not decide for `tally up`: the test gives it its own
# stores and wants its defaults for everything else (the development tokens above all).
INHERITED_SETTINGS = re.compile(
    r"^(TALLY_|STRIPE_|DATABASE_URL$|REDIS_URL$|KAFKA_BOOTSTRAP_SERVERS$|CLICKHOUSE_URL$)"
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    line: int  # of the opening fence, 1-based
    info: str  # the fence's info string: ``sh``, ``python``…
    code: str
    not_run: str | None  # the reason given in a ``<!-- not run: … -->`` marker

    @property
    def runs(self) -> bool:
        return self.info == "sh" and self.not_run is None


def blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text``, each with the not-run marker on the line before it."""
    lines = text.splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        close = next((n for n in range(index + 1, len(lines)) if lines[n].startswith("```")), None)
        assert close is not None, f"README.md:{index + 1}: a fence that is never closed"
        marker = NOT_RUN.fullmatch(lines[index - 1].strip()) if index else None
        found.append(
            Block(
                line=index + 1,
                info=opening["info"].strip(),
                code="\n".join(lines[index + 1 : close]),
                not_run=marker["reason"] if marker else None,
            )
        )
        index = close + 1
    return found


def test_every_shell_block_runs_or_says_why() -> None:
    text = README.read_text()
    found = blocks(text)
    for block in found:
        assert block.info not in OTHER_SHELLS, (
            f"README.md:{block.line}: fence shell examples as ```sh, so that this test runs them"
        )
    marked = [n + 1 for n, line in enumerate(text.splitlines()) if "<!-- not run" in line]
    placed = [b.line - 1 for b in found if b.info == "sh" and b.not_run is not None]
    assert marked == placed, (
        "each `<!-- not run: reason -->` must give a reason and sit on the line right"
        f" before a ```sh fence: markers on lines {marked}, effective ones on {placed}"
    )
    tour = [b for b in found if b.runs]
    assert len(tour) >= 5 and all(BASE_URL in b.code for b in tour), (
        f"the tour's blocks should call Tally at {BASE_URL}: {[b.line for b in tour]}"
    )


def anchors(markdown: Path) -> set[str]:
    """The ``#fragment`` each heading of ``markdown`` gets, as GitHub makes them."""
    found = set()
    for line in markdown.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_links_between_the_pages_lead_somewhere(page: Path) -> None:
    """The README points into docs/ and the pages into each other: a moved file or a
    renamed heading must not leave a dead link behind."""
    dead = []
    for match in LINK.finditer(page.read_text()):
        target = match["target"]
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (fragment and fragment not in anchors(linked)):
            dead.append(target)
    assert not dead, f"{page.name}: dead links {dead}"


@pytest.fixture
def tally_up(tmp_path: Path) -> Iterator[TallyProcess]:
    """`tally up` as `make up` starts it, but on a database it creates for this test (as
    on a first run: the catalog as shipped, no edits by other tests), the test Redis db
    and a free port."""
    name = f"tally_readme_{uuid.uuid4().hex[:10]}"
    stores = {
        "DATABASE_URL": urlsplit(ADMIN_URL)._replace(path=f"/{name}").geturl(),
        "REDIS_URL": REDIS_URL,
        "TALLY_DATA_DIR": str(tmp_path / "data"),
    }
    process = TallyProcess(["up"], {}, tmp_path / "tally-up.log")
    kept = {k: v for k, v in os.environ.items() if not INHERITED_SETTINGS.match(k)}
    process.env = kept | stores | {"TALLY_HOST": "127.0.0.1"}
    try:
        yield process.start()
    finally:
        if process.process is not None:
            process.stop()
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def run_tour(tour: list[Block], url: str, cwd: Path) -> tuple[int, dict[int, str]]:
    """The blocks as one bash script; its exit status and each block's output by line."""
    script = ["set -euo pipefail"]
    for block in tour:
        script += [f"echo '{MARK}{block.line}'", block.code.replace(BASE_URL, url)]
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not INHERITED_SETTINGS.match(k)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
    )
    outputs: dict[int, str] = {}
    for chunk in done.stdout.split(MARK)[1:]:
        line, _, output = chunk.partition("\n")
        outputs[int(line)] = output
    return done.returncode, outputs


def output_of(tour: list[Block], outputs: dict[int, str], calls: str) -> str:
    """The output of the one tour block that calls ``calls``."""
    found = [b for b in tour if calls in b.code]
    assert len(found) == 1, f"expected one README block calling {calls}, found {len(found)}"
    return outputs[found[0].line]


@pytest.mark.slow
def test_the_readme_tour_runs(tally_up: TallyProcess, tmp_path: Path) -> None:
    missing = [tool for tool in ("bash", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the README's tour needs {', '.join(missing)}")
    tour = [b for b in blocks(README.read_text()) if b.runs]
    status, outputs = run_tour(tour, tally_up.url, tmp_path)
    if status != 0:
        failed = max(outputs)
        raise AssertionError(
            f"the README block at line {failed} failed (exit {status}):\n{outputs[failed]}"
            f"\n--- tally up ---\n{tally_up.tail(30)}"
        )
    assert set(outputs) == {b.line for b in tour}

    signup = output_of(tour, outputs, "/v1/signup")
    assert '"plan": "free"' in signup and '"key": "tally_live_' in signup, signup

    emitted = output_of(tour, outputs, "/v1/events")
    assert emitted.rstrip().endswith("HTTP 202"), emitted
    assert '"accepted":3,"duplicates":1,"rejected":0' in emitted, emitted

    usage = output_of(tour, outputs, "/usage?")
    counted = {row["endpoint"]: row["value"] for row in map(json.loads, usage.splitlines())}
    assert counted == {"/v1/search": "2", "/v1/geocode": "1"}, usage

    limited = output_of(tour, outputs, "/v1/enforce")
    codes, _, refusal = limited.partition("\n")
    assert codes.split() == ["200"] * 10 + ["429"], limited
    head = refusal.lower()
    assert head.startswith("http/1.1 429"), refusal
    for header in ("ratelimit-policy:", "ratelimit:", "retry-after:"):
        assert f"\n{header}" in head, f"no {header} in the refusal:\n{refusal}"
    assert "problems/rate-limited" in refusal and '"upgrade":{"plan":"starter"' in refusal

    upcoming = json.loads(output_of(tour, outputs, "/invoices/upcoming"))
    assert re.fullmatch(r"\d{4}-\d{2}", upcoming["period"]), upcoming
    assert upcoming["total"] == "0.00" and upcoming["lines"][0]["description"].startswith(
        "api_calls on Free"
    ), upcoming

    moved = json.loads(output_of(tour, outputs, "/v1/admin/customers/"))
    assert (moved["plan"], moved["status"]) == ("starter", "active"), moved

    added, *alerts = output_of(tour, outputs, "/alerts").splitlines()
    assert json.loads(added)["kind"] == "spend", added
    shown = {row["id"]: row for row in map(json.loads, alerts)}
    assert shown["plan"]["value"] == ["80", "90", "100"], alerts
    assert shown["plan"]["fires_at"] == ["40000", "45000", "50000"], alerts
    (spend,) = (row for row in shown.values() if row["kind"] == "spend")
    assert spend["value"] == ["60"] and int(spend["fires_at"][0]) > 50_000, alerts

    endpoint, sent, *log = output_of(tour, outputs, "/webhook-endpoints").splitlines()
    assert json.loads(endpoint)["secret"].startswith("whsec_"), endpoint
    assert json.loads(sent)["notification_id"].startswith("msg_"), sent
    told = {row["type"]: row["deliveries"] for row in map(json.loads, log)}
    assert set(told) >= {"webhook.test", "plan.changed"}, log
    (tested,) = told["webhook.test"]
    assert (tested["channel"], tested["state"]) == ("webhook", "pending"), tested
    assert tested["attempts"] >= 1 and tested["last_error"] and tested["next_attempt_at"], tested
