"""Every ```python block in docs/*.md runs, in order, one namespace per page.

Blocks fenced as ```text, ```sql, ```bash ... are shown, not run. A page's examples run in
a temporary working directory, offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
README = DOCS.parent / "README.md"
PAGES = [p for p in [*sorted(DOCS.glob("*.md")), README] if BLOCK.search(p.read_text())]


def test_there_are_pages_with_examples() -> None:
    assert len(PAGES) >= 3, [p.name for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = BLOCK.findall(page.read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    try:
        for number, source in enumerate(blocks, start=1):
            code = compile(source, f"{page.name} (example {number})", "exec")
            exec(code, namespace)
    finally:
        _dispose_engines(namespace)


def _dispose_engines(namespace: dict[str, object]) -> None:
    """Close the connections of the engines a page made, as its application would at exit.

    Left to the garbage collector, SQLite connections warn (Python 3.13), and here a
    warning is an error in whichever test happens to collect them.
    """
    try:
        from sqlalchemy import Engine
    except ImportError:
        return
    for value in namespace.values():
        if isinstance(value, Engine):
            value.dispose()
