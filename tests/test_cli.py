"""The rag-instrument command: help, version, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rag_instrument as ri
from rag_instrument.cli.__main__ import main


def _script() -> str:
    return str(Path(sys.executable).with_name("rag-instrument"))


def test_help_and_version() -> None:
    out = subprocess.run([_script(), "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout
    version = subprocess.run([_script(), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"rag-instrument {ri.__version__}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: rag-instrument" in capsys.readouterr().out


def test_demo_writes_a_log_and_prints_timings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "demo.jsonl"
    assert main(["demo", "--requests", "5", "--concurrency", "5", "--log-file", str(log)]) == 0
    out = capsys.readouterr().out
    assert f"JSON log: {log}" in out
    for stage_name in ("query_rewriting", "retrieval", "reranking", "generation", "search"):
        assert stage_name in out
    lines = [json.loads(raw) for raw in log.read_text().splitlines()]
    completed = [line for line in lines if line["event"] == "search completed"]
    assert len(completed) == 5
    assert {line["context"]["request_id"] for line in completed} == {
        f"req-{i:03d}" for i in range(5)
    }
    retrieval = next(line for line in lines if line["event"] == "retrieval completed")
    assert set(retrieval["breakdown"]) == {"db", "vector", "embedding"}


def test_demo_as_a_fresh_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_INSTRUMENT_")}
    result = subprocess.run(
        [_script(), "demo", "--requests", "3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (log,) = tmp_path.glob("rag-demo-*.jsonl")
    assert str(log.resolve()) in result.stdout


@pytest.mark.parametrize("command", ["demo", "db-doctor"])
def test_help_text_has_no_restructuredtext_markup(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rag_instrument.cli.__main__ import main as cli_main

    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    assert ":func:`" not in out
