"""The documentation: links resolve, the README stays short, and no file narrates how the project
was developed. Fast, no engine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: The Markdown files whose links are checked: the README, docs/, the chart's README, the changelog.
LINKED_FILES = [README, *sorted(DOCS.glob("*.md")), ROOT / "charts" / "loragate" / "README.md", ROOT / "CHANGELOG.md"]

MAX_README_LINES = 250
#: Words of a development diary: documentation and code speak of what the project is and does.
NARRATION = re.compile(r"this session|previous session|later session|of the day", re.I)
NARRATION_EXEMPT = {"CHANGELOG.md", "tests/test_docs.py"}

_FENCE = re.compile(r"^ *```.*?^ *```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    """Targets of the inline links of a Markdown file, outside code blocks and code spans."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _tracked(*patterns: str) -> list[str]:
    """Files git tracks, or would track (untracked but not ignored), matching ``patterns``."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *patterns],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted({line for line in out.splitlines() if line and (ROOT / line).is_file()})


def test_the_documents_exist_and_the_readme_links_each() -> None:
    names = {"architecture", "contracts", "proxy", "gate", "load", "reliability", "performance", "local-stack"}
    assert {p.stem for p in DOCS.glob("*.md")} >= names
    linked = {(README.parent / target.split("#")[0]).resolve() for target in _links(README)}
    for doc in [*DOCS.glob("*.md"), ROOT / "charts" / "loragate" / "README.md", ROOT / "CHANGELOG.md"]:
        assert doc.resolve() in linked, f"README.md does not link {doc.relative_to(ROOT)}"


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(path: Path) -> None:
    assert path.is_file(), path
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_the_readme_is_at_most_250_lines() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; reference material belongs in docs/"


def test_no_file_narrates_how_the_project_was_developed() -> None:
    found = []
    for name in _tracked("*.md", "*.py"):
        if name in NARRATION_EXEMPT:
            continue
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if NARRATION.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "development narration (say what the code does, date numbers in docs/performance.md):\n" + \
        "\n".join(found)
