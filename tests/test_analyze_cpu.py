"""``analyze`` shows the stages' ``cpu_ms`` beside ``avg_ms`` when the log has it."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument.analysis import Aggregator, Source, _parallel, analyze
from rag_instrument.cli.__main__ import main
from support.collector_file import write_collector_file
from support.otlp_receiver import OTLPReceiver


def spin_cpu(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


@ri.stage("reranking")
def rerank() -> None:
    spin_cpu(20)  # computing


@ri.stage("retrieval")
def retrieve() -> None:
    time.sleep(0.05)  # waiting


def run_requests(n: int) -> None:
    for _ in range(n):
        retrieve()
        rerank()


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["analyze", *args]) == 0
    return capsys.readouterr().out


def test_a_real_log_shows_cpu_beside_avg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log), resource_metrics=True)
    run_requests(3)
    ri.shutdown()

    table = cli([str(log)], capsys)
    header = table.splitlines()[0].split()
    assert header[:6] == ["stage", "runs", "errors", "avg", "ms", "cpu"]  # "avg ms", "cpu ms"
    rows = {row["stage"]: row for row in json.loads(cli([str(log), "--format", "json"], capsys))}
    computing, waiting = rows["reranking"], rows["retrieval"]
    assert computing["cpu_runs"] == waiting["cpu_runs"] == 3
    assert 20 <= computing["avg_cpu_ms"] <= computing["avg_ms"] + 1
    assert waiting["avg_cpu_ms"] < 25 <= waiting["avg_ms"]  # the sleep used no CPU
    table_line = next(x for x in table.splitlines() if x.startswith("reranking"))
    assert f"{computing['avg_cpu_ms']:.1f}" in table_line.split()

    csv_rows = list(csv.DictReader(io.StringIO(cli([str(log), "--format", "csv"], capsys))))
    assert list(csv_rows[0])[4:6] == ["avg_ms", "avg_cpu_ms"]
    by_stage = {row["stage"]: row for row in csv_rows}
    assert float(by_stage["reranking"]["avg_cpu_ms"]) == pytest.approx(computing["avg_cpu_ms"])


def line(stage: str, ms: float, **extra: Any) -> str:
    record = {
        "timestamp": "2026-11-25T15:33:19.000000Z", "level": "info",
        "event": f"{stage} completed", "logger": "rag_instrument", "trace_id": "a" * 32,
        "span_id": "b" * 16, "context": {"pipeline_stage": stage}, "execution_time_ms": ms,
        **extra,
    }
    return json.dumps(record, separators=(",", ":"))


def test_without_cpu_ms_there_is_no_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "rag.jsonl"
    log.write_text(line("retrieval", 10.0) + "\n" + line("retrieval", 30.0) + "\n")
    assert "cpu" not in cli([str(log)], capsys)
    assert "avg_cpu_ms" not in cli([str(log), "--format", "csv"], capsys).splitlines()[0]
    (row,) = json.loads(cli([str(log), "--format", "json"], capsys))
    assert (row["avg_cpu_ms"], row["cpu_runs"]) == (None, 0)


def test_the_average_is_over_the_runs_that_reported_it(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    lines = [
        line("reranking", 10.0, cpu_ms=8.0),
        line("reranking", 30.0, cpu_ms=2.0),
        line("reranking", 50.0),  # an async run that suspended: no cpu_ms
        line("reranking", 70.0, cpu_ms="x"),  # not a number: ignored
    ]
    log.write_text("\n".join(lines) + "\n")
    (row,) = analyze([str(log)]).rows
    assert (row.count, row.avg_ms) == (4, 40.0)
    assert (row.cpu_runs, row.avg_cpu_ms) == (2, 5.0)


def test_split_reading_adds_up_the_cpu_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_parallel, "MIN_BYTES", 1 << 16)
    monkeypatch.setattr(_parallel, "_MIN_RANGE", 1 << 16)
    log = tmp_path / "big.jsonl"
    log.write_text("".join(line("retrieval", 10.0 + i % 7, cpu_ms=float(i % 5)) + "\n"
                           for i in range(4000)))
    assert len(_parallel.ranges(str(log), 3)) == 3
    results = []
    for jobs in (1, 3):
        aggregator = Aggregator()
        aggregator.feed_source(Source(str(log)), jobs=jobs)
        (row,) = aggregator.result().rows
        results.append((row.cpu_runs, row.avg_cpu_ms))
    assert results[0] == results[1]
    assert results[0] == (4000, pytest.approx(2.0))


def test_collector_files_carry_it_as_rag_cpu_ms(tmp_path: Path) -> None:
    with OTLPReceiver() as receiver:
        ri.configure(exporter="otlp", otlp_endpoint=receiver.endpoint, resource_metrics=True)
        run_requests(2)
        ri.shutdown()
        assert receiver.wait_for_spans(4)
        spans_file = write_collector_file(list(receiver.trace_requests), tmp_path / "traces.json")
    rows = {r.key: r for r in analyze([str(spans_file)]).rows}
    assert rows["reranking"].cpu_runs == 2
    assert rows["reranking"].avg_cpu_ms is not None
    assert rows["reranking"].avg_cpu_ms >= 20
