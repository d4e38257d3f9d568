"""I. Load and memory (RELIABILITY.md I47-I50)."""

from __future__ import annotations

import importlib.util
import logging
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

import rag_instrument as ri
from rag_instrument._utils import internal_error
from rag_instrument.testing import Capture, capture

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _soak_module() -> Any:
    spec = importlib.util.spec_from_file_location("rag_soak", SOAK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rag_soak"] = module
    spec.loader.exec_module(module)
    return module


def test_i47_fifty_thousand_calls_with_the_exporter_down_plateau() -> None:
    soak = _soak_module()
    result = soak.soak(50_000, 10_000, 10_000, quiet=True, light=True)
    # The suite's short run: a leak of a few hundred bytes per call (a span, a context,
    # a cache flight kept alive) is well past this; 1M calls run in benchmarks/soak.py.
    assert result.problems(goal_mb=8.0) == []
    assert all(s.open_spans == 0 and s.in_flight == 0 for s in result.samples)
    assert len({s.listeners for s in result.samples}) == 1


def test_i48_a_long_stream_is_not_buffered(rag_capture: Capture) -> None:
    chunk = "x" * 1_000

    @ri.stage("generation")
    def stream() -> Iterator[str]:
        for _ in range(100_000):
            yield chunk + ""  # a fresh string each time, as a network stream gives

    tracemalloc.start()
    try:
        count = sum(1 for _ in stream())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak < 5_000_000  # 100 MB went through; a buffer would show here
    assert rag_capture.span("generation").attributes["rag.stream.items"] == 100_000


def test_i49_a_flood_of_identical_internal_failures_is_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS")
    with capture(capture_logging=True) as cap, caplog.at_level(logging.WARNING):
        for _ in range(10_000):
            internal_error("a hot path", RuntimeError("same failure"))
    internal = [r for r in caplog.records if r.name == "rag_instrument.internal"]
    assert len(internal) == 1
    assert len([line for line in cap.logs if "internal error" in str(line.get("event"))]) <= 1


class Counting(SpanExporter):
    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


def test_i50_a_tight_loop_of_stages_loses_no_span(tmp_path: Path) -> None:
    exporter = Counting()
    ri.configure(exporter=exporter, log_file=str(tmp_path / "rag.jsonl"))
    log = ri.get_logger()
    for i in range(20_000):
        with ri.stage("retrieval"):
            log.info("step", i=i)
    assert ri.shutdown(timeout=30.0) is True
    assert exporter.count == 20_000
