"""The jq one-liner people already run over these logs gives the spans' numbers, and
``rag-instrument analyze --format json`` gives the jq one-liner's."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

import rag_instrument as ri
from rag_instrument import _runtime

JQ = (
    "jq 'select(.context.pipeline_stage) | {stage: .context.pipeline_stage, "
    "time: .execution_time_ms}' | jq -s 'group_by(.stage) | map({stage: .[0].stage, "
    "avg_time: (map(.time) | add / length), max_time: (map(.time) | max)})'"
)
#: The robust form from docs/logs.md: also right when the application logs inside stages.
JQ_ROBUST = JQ.replace(
    "select(.context.pipeline_stage)", "select(.context.pipeline_stage and .execution_time_ms)"
)


class Flaky(ri.CacheMixin, ri.RetryMixin, ri.LLMProvider):
    """Fails each new prompt once (a retry), answers repeats from the cache."""

    system, model = "stand-in", "m"
    retry_attempts, retry_wait_min, retry_wait_max = 3, 0.0, 0.001

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def _generate(self, prompt: str, **params: object) -> str:
        if prompt not in self.seen:
            self.seen.add(prompt)
            raise ConnectionError("503 overloaded")
        return "answer"


def _jq(command: str, log: Path) -> dict[str, dict[str, Any]]:
    if shutil.which("jq") is None:
        pytest.fail("jq is not installed (.ci/services.sh installs it)")
    result = subprocess.run(
        f"cat {log} | {command}", shell=True, capture_output=True, text=True, check=True
    )
    return {row["stage"]: row for row in json.loads(result.stdout)}


def _analyze(log: Path) -> dict[str, dict[str, Any]]:
    script = str(Path(sys.executable).with_name("rag-instrument"))
    result = subprocess.run(
        [script, "analyze", str(log), "--format", "json"],
        capture_output=True, text=True, check=True,
    )
    return {row["stage"]: row for row in json.loads(result.stdout)}


def _write_log(log: Path, engine: Any) -> list[Any]:
    # Debug level: traced operations' lines and budget warnings are in the file too, and
    # must not be counted as stage runs.
    ri.configure(
        exporter="memory", log_file=str(log), budgets={"retrieval": 1.0}, log_level="debug"
    )
    logger = ri.get_logger("app")
    Flaky.cache_clear()
    model = Flaky()
    # Lines that time something inside a stage (an LLM call, a slow statement), retries,
    # cache hits and N+1 warnings are in the file too, and must not be counted as runs.
    ri.instrument_sqlalchemy(engine, slow_query_ms=0.0, n_plus_one_threshold=3)
    for i in range(4):
        with ri.request_context(request_id=f"r-{i}"):
            logger.info("request received", i=i)
            with ri.stage("search"):
                with ri.stage("retrieval"), engine.connect() as conn:
                    for k in range(3):  # the same statement shape three times: N+1
                        conn.execute(sqlalchemy.text("SELECT :k"), {"k": k})
                    time.sleep(0.01 * (i + 1))  # stages that take measurable, distinct time
                with ri.stage("generation"), ri.traced("tokenize"):
                    asyncio.run(model.generate(f"q{i % 2}"))  # q0, q1 retried; repeats cached
                    time.sleep(0.02)
    pipelines = _runtime.get_runtime().pipelines
    assert pipelines is not None
    assert pipelines.memory_exporter is not None
    spans = list(pipelines.memory_exporter.get_finished_spans())
    ri.shutdown()
    return spans


def test_jq_pipeline_matches_span_durations_and_analyze(tmp_path: Path, sqlite_engine: Any) -> None:
    log = tmp_path / "rag.jsonl"
    spans = _write_log(log, sqlite_engine())
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    events = {x["event"] for x in lines}
    assert {"llm call completed", "slow query", "n+1 query detected", "retrying",
            "budget exceeded", "tokenize completed"} <= events
    assert any(x.get("cache_hit") is True for x in lines)

    # One stage run, one line: only a stage's own line has context.pipeline_stage with a
    # duration; the library's other lines inside a stage name it in top-level "stage".
    for x in lines:
        if x.get("context", {}).get("pipeline_stage") and "execution_time_ms" in x:
            assert x["event"] == f"{x['context']['pipeline_stage']} completed", x
        if x["logger"] == "rag_instrument" and x["event"] in (
            "llm call completed", "slow query", "n+1 query detected", "retrying",
            "tokenize completed",
        ):
            assert "pipeline_stage" not in x["context"], x
            assert x["stage"] in ("retrieval", "generation"), x

    # `cat FILE | jq ...`, exactly as in the README and the performance guide.
    rows = _jq(JQ, log)
    assert set(rows) == {"search", "retrieval", "generation"}
    for stage_name, row in rows.items():
        durations = [
            (s.end_time - s.start_time) / 1e6  # type: ignore[operator]
            for s in spans
            if s.name == stage_name
        ]
        assert len(durations) == 4
        # The log and the span time the same run; 2 ms covers a loaded machine, and one
        # wrongly counted line (a ~0 ms measurement) would move an average by 4 ms or more.
        assert row["avg_time"] == pytest.approx(sum(durations) / 4, abs=2.0)
        assert row["max_time"] == pytest.approx(max(durations), abs=2.0)

    ours = _analyze(log)
    assert set(ours) == set(rows)
    for stage_name, row in rows.items():
        assert ours[stage_name]["avg_time"] == pytest.approx(row["avg_time"], rel=1e-12)
        assert ours[stage_name]["max_time"] == row["max_time"]
    assert _jq(JQ_ROBUST, log) == rows


def test_the_robust_one_liner_survives_application_lines_inside_stages(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(exporter="memory", log_file=str(log))
    app = ri.get_logger("app")
    for _ in range(3):
        with ri.stage("retrieval"):
            app.info("fetched candidates", candidates=12)  # context.pipeline_stage, no time
    ri.shutdown()
    plain, robust, ours = _jq(JQ, log), _jq(JQ_ROBUST, log), _analyze(log)
    # The plain one-liner counts the application's lines as runs of zero; the robust one
    # and analyze do not.
    assert plain["retrieval"]["avg_time"] == pytest.approx(robust["retrieval"]["avg_time"] / 2)
    assert ours["retrieval"]["avg_time"] == pytest.approx(robust["retrieval"]["avg_time"])
    assert ours["retrieval"]["count"] == 3


def _readme_one_liner() -> str:
    """The jq pipeline exactly as README.md shows it, without its ``cat FILE |``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("cat logs/rag.jsonl | jq ")]
    return line.removeprefix("cat logs/rag.jsonl | ")


def test_the_readme_one_liner_agrees_with_analyze_with_application_lines(
    tmp_path: Path,
) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(exporter="memory", log_file=str(log))
    app = ri.get_logger("app")
    for i in range(3):
        with ri.stage("retrieval"):
            app.info("fetched candidates", candidates=12)  # context.pipeline_stage, no time
            logging.getLogger("httpx").warning("HTTP Request: POST http://x/v1 %s", i)
            time.sleep(0.002)
    ri.shutdown()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    in_stage = [x["logger"] for x in lines if x.get("context", {}).get("pipeline_stage")]
    assert in_stage.count("app") == in_stage.count("httpx") == 3  # not runs, but in a stage
    rows, ours = _jq(_readme_one_liner(), log), _analyze(log)
    assert set(rows) == set(ours) == {"retrieval"}
    assert ours["retrieval"]["count"] == 3
    assert rows["retrieval"]["avg_time"] == pytest.approx(ours["retrieval"]["avg_time"], rel=1e-12)
    assert rows["retrieval"]["max_time"] == ours["retrieval"]["max_time"]
