"""The rag-instrument command: help, version, and the demo."""

from __future__ import annotations

import json
import os
import re
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


def test_demo_writes_a_log_and_a_report_and_prints_the_analysis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, report = tmp_path / "demo.jsonl", tmp_path / "out" / "report.html"
    report.parent.mkdir()
    assert main(["demo", "--log-file", str(log), "--report", str(report)]) == 0  # 50 requests
    out, err = capsys.readouterr()
    assert err == ""  # no progress bar when stderr is not a terminal
    assert f"JSON log: {log.resolve()}" in out
    assert f"Report:   {report.resolve()}  <- open it in a browser" in out
    assert report.read_text().startswith("<!DOCTYPE html>")
    table = out[out.index("stage  ") :]
    for stage_name in ("query_rewriting", "retrieval", "embedding", "reranking", "generation"):
        assert f"\n  {stage_name} " in table or f"\n    {stage_name} " in table
    assert "search (whole request)    50" in table
    assert re.search(r"\d+ of 50 over 150 ms", table)  # the budget column, readable
    assert "ingestion " in table
    for column in ("db %", "llm %", "vector %", "embedding %", "cache hits"):
        assert column in table
    # What the analysis finds in the demo: the slow query, the N+1, retries, the cache.
    assert "WITH RECURSIVE" in out
    assert re.search(r"Document\.chunks\s+50\s+5\s+reranking", out)
    assert re.search(r"StandInLLM\.generate\s+TransientError\s+\d+", out)
    assert "stand-in/demo-llm" in out
    lines = [json.loads(raw) for raw in log.read_text().splitlines()]
    completed = [line for line in lines if line["event"] == "search completed"]
    assert len(completed) == 50
    assert {line["context"]["request_id"] for line in completed} == {
        f"req-{i:03d}" for i in range(50)
    }
    retrieval = next(line for line in lines if line["event"] == "retrieval completed")
    assert set(retrieval["breakdown"]) == {"db", "vector", "embedding"}


def test_demo_progress_bar_only_on_a_terminal() -> None:
    import io

    from rag_instrument.cli.demo import _Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = _Progress(4, stream)
        for _ in range(4):
            bar.step()
    assert pipe.getvalue() == ""
    assert tty.getvalue().endswith(f"\r[{'#' * 30}] 4/4\n")
    assert "\r[#######" in tty.getvalue()


def test_demo_without_sqlalchemy_leaves_the_database_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "sqlalchemy" or m.startswith("sqlalchemy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # import sqlalchemy -> ImportError
    log = tmp_path / "demo.jsonl"
    assert main(["demo", "--requests", "4", "--log-file", str(log),
                 "--report", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "pip install 'rag_instrument[sqlalchemy]'" in out
    assert "(no database, in-process vector index, stand-in LLM)" in out
    assert "search (whole request)     4" in out
    assert "db %" not in out
    assert main(["demo", "--postgres", "postgresql://x/y", "--log-file", str(log)]) == 2
    assert "pip install 'rag_instrument[postgres]'" in capsys.readouterr().err


@pytest.mark.postgres
def test_demo_on_postgres(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from db.db_helpers import PG_URL, require_postgres

    require_postgres()
    log = tmp_path / "demo.jsonl"
    assert main(["demo", "--requests", "10", "--postgres", PG_URL, "--log-file", str(log),
                 "--report", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "(PostgreSQL, in-process vector index, stand-in LLM)" in out
    assert re.search(r"Document\.chunks\s+10\s+5\s+reranking", out)
    slow = [json.loads(x) for x in log.read_text().splitlines() if '"slow query"' in x]
    assert slow
    assert all(x["db.system.name"] == "postgresql" for x in slow)


def test_demo_on_an_unreachable_postgres_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 140-line SQLAlchemy traceback and exit status 1 before.
    url = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test"
    status = main(["demo", "--requests", "2", "--postgres", url,
                   "--log-file", str(tmp_path / "d.jsonl"), "--report", str(tmp_path / "r.html")])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("rag-instrument demo: cannot connect to postgresql+psycopg://")
    assert "Connection refused" in err
    assert err.count("\n") == 1
    assert "hunter2" not in err


def test_demo_with_an_unwritable_log_or_report_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, report = str(tmp_path / "d.jsonl"), str(tmp_path / "r.html")
    for args, said in (
        (["--log-file", str(tmp_path), "--report", report], "--log-file"),
        (["--log-file", log, "--report", str(tmp_path / "missing" / "r.html")], "--report"),
    ):
        assert main(["demo", "--requests", "2", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rag-instrument demo: {said} ")
        assert err.count("\n") == 1
    assert not (tmp_path / "d.jsonl").exists()  # nothing left behind by the check


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgresql+foo://u:pw@127.0.0.1:1/db", "cannot use postgresql+foo"),
        ("postgresql+asyncpg://u:pw@127.0.0.1:1/db", "synchronously"),
    ],
)
def test_demo_refuses_drivers_it_cannot_use_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, said: str
) -> None:
    try:
        status = main(["demo", "--requests", "2", "--postgres", url,
                       "--log-file", str(tmp_path / "d.jsonl")])
    except SystemExit as exc:  # refused by the argument check
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert said in err
    assert "Traceback" not in err
    assert ":pw@" not in err


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


def test_demo_on_milvus_lite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pymilvus  # the milvus extra, part of dev
    db = tmp_path / "milvus.db"
    log = tmp_path / "demo.jsonl"
    assert main(["demo", "--requests", "4", "--milvus", str(db), "--log-file", str(log),
                 "--report", str(tmp_path / "r.html")]) == 0
    assert "(SQLite, Milvus, stand-in LLM)" in capsys.readouterr().out
    retrieval = [json.loads(x) for x in log.read_text().splitlines()
                 if '"retrieval completed"' in x]
    assert len(retrieval) == 4
    assert all(line["breakdown"]["vector"]["count"] == 1 for line in retrieval)
    client = pymilvus.MilvusClient(str(db))
    try:
        assert not [c for c in client.list_collections() if c.startswith("rag_demo_")]
    finally:
        client.close()


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


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--concurrency", "0"], "--concurrency"),  # hung for ever
        (["--concurrency", "-3"], "--concurrency"),  # a traceback
        (["--requests", "-1"], "--requests"),  # "ran -1 requests"
        (["--fault-rate", "2"], "--fault-rate"),
        (["--fault-rate", "nan"], "--fault-rate"),
        (["--postgres", "notaurl"], "--postgres"),  # a SQLAlchemy traceback
        (["--postgres", "sqlite:///x.db"], "--postgres"),
    ],
)
def test_demo_refuses_bad_arguments_by_name(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    assert f"argument {named}:" in capsys.readouterr().err
