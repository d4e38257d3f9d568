"""The documents point at what exists, and the README's first example shows what it says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rag_instrument as ri

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)")
MENTION = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
FILES = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    ROOT / "pyproject.toml",
    *ROOT.glob("docs/*.md"),
]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_referenced_document_exists(path: Path) -> None:
    text = path.read_text()
    missing = [
        target
        for target in LINK.findall(text)
        if "://" not in target and not (path.parent / target).exists()
    ]
    missing += [name for name in MENTION.findall(text) if not (ROOT / name).exists()]
    assert missing == [], f"{path.name} refers to documents not in the repository: {missing}"


def test_readme_links_the_security_policy() -> None:
    assert "[SECURITY.md](SECURITY.md)" in (ROOT / "README.md").read_text()


def test_readme_example_puts_the_request_id_on_every_stage_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (ROOT / "README.md").read_text()
    source = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    assert source is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(source.group(1), "README.md", "exec"), {"__name__": "readme"})
    ri.shutdown()
    lines = [json.loads(line) for line in (tmp_path / "logs/rag.jsonl").read_text().splitlines()]
    stage_lines = [line for line in lines if line["context"].get("pipeline_stage")]
    assert {line["context"]["pipeline_stage"] for line in stage_lines} == {"retrieval", "search"}
    assert all(line["context"].get("request_id") == "r-1" for line in stage_lines)
