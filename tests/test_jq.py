"""The jq one-liner people already run over these logs gives the spans' numbers."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy

import rag_instrument as ri
from rag_instrument import _runtime

JQ = (
    "jq 'select(.context.pipeline_stage) | {stage: .context.pipeline_stage, "
    "time: .execution_time_ms}' | jq -s 'group_by(.stage) | map({stage: .[0].stage, "
    "avg_time: (map(.time) | add / length), max_time: (map(.time) | max)})'"
)


def test_jq_pipeline_matches_span_durations(tmp_path: Path) -> None:
    if shutil.which("jq") is None:
        pytest.fail("jq is not installed (.ci/services.sh installs it)")
    log = tmp_path / "rag.jsonl"
    # Debug level: traced operations' lines and budget warnings are in the file too, and
    # must not be counted as stage runs.
    ri.configure(
        exporter="memory", log_file=str(log), budgets={"retrieval": 1.0}, log_level="debug"
    )
    logger = ri.get_logger("app")

    class Model(ri.LLMProvider):
        system, model = "stand-in", "m"

        async def _generate(self, prompt: str, **params: object) -> str:
            return "answer"

    # Lines that time something inside a stage (an LLM call, a slow statement) are in the
    # file too, and must not be counted as stage runs either.
    engine = sqlalchemy.create_engine("sqlite://")
    ri.instrument_sqlalchemy(engine, slow_query_ms=0.0)
    for i in range(4):
        with ri.request_context(request_id=f"r-{i}"):
            logger.info("request received", i=i)
            with ri.stage("search"):
                with ri.stage("retrieval"), engine.connect() as conn:
                    conn.execute(sqlalchemy.text("SELECT 1"))
                    time.sleep(0.004 * (i + 1))
                with ri.stage("generation"), ri.traced("tokenize"):
                    asyncio.run(Model().generate("q"))
                    time.sleep(0.003)
    pipelines = _runtime.get_runtime().pipelines
    assert pipelines is not None
    assert pipelines.memory_exporter is not None
    spans = pipelines.memory_exporter.get_finished_spans()
    ri.shutdown()
    events = log.read_text()
    assert '"llm call completed"' in events
    assert '"slow query"' in events

    # `cat FILE | jq ...`, exactly as in the README and the performance guide.
    result = subprocess.run(
        f"cat {log} | {JQ}", shell=True, capture_output=True, text=True, check=True
    )
    rows = {row["stage"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"search", "retrieval", "generation"}
    for stage_name, row in rows.items():
        durations = [
            (s.end_time - s.start_time) / 1e6  # type: ignore[operator]
            for s in spans
            if s.name == stage_name
        ]
        assert len(durations) == 4
        assert row["avg_time"] == pytest.approx(sum(durations) / 4, abs=0.5)
        assert row["max_time"] == pytest.approx(max(durations), abs=0.5)
