"""The checkout carries what its documents and tests need (issue #12, defect 11): a clone with
nothing beside it has every file the README links to, and nothing points outside the tree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) and [text](target#anchor)
OUTSIDE = re.compile(r"/work/|\.\./shared\b")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--", *patterns],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / line for line in out.splitlines() if line]


def test_every_relative_link_in_the_documents_resolves_inside_the_repository() -> None:
    documents = _tracked("*.md")
    assert ROOT / "README.md" in documents and ROOT / "docs/DESIGN.md" in documents
    broken = []
    for doc in documents:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path = (doc.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_no_source_test_or_document_refers_to_paths_outside_the_checkout() -> None:
    files = _tracked("*.py", "*.md", "*.sh", "Makefile", "*.toml", "*.yaml", ".ci/run")
    found = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        if f != Path(__file__).resolve() and f.is_file()
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert found == []
