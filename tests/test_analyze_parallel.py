"""A large file read by several processes gives exactly what one process finds."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from rag_instrument.analysis import Aggregator, Source, _parallel, percentile
from rag_instrument.analysis._stats import Sample


def _write(path: Path, lines: int, bad_at: int) -> None:
    rng = random.Random(5)
    with path.open("w") as out:
        for i in range(1, lines + 1):
            if i == bad_at:
                out.write('{"truncated": \n')
                continue
            stage = ("retrieval", "generation", "rerank")[i % 3]
            record = {
                "timestamp": "2026-11-25T15:33:19.000000Z", "level": "info",
                "event": f"{stage} completed", "logger": "rag_instrument",
                "context": {"pipeline_stage": stage}, "execution_time_ms": rng.random() * 100,
                "breakdown": {"db": {"count": 1, "ms": 1.5}, "cache": {"hits": 1, "misses": 1}},
            }
            if i % 50 == 0:
                record = {"event": "retrying", "logger": "rag_instrument", "target": "m",
                          "error_type": "E", "stage": stage}
            out.write(json.dumps(record) + "\n")


def _run(path: Path, jobs: int, max_values: int = 1_000_000) -> Aggregator:
    aggregator = Aggregator(max_values=max_values)
    aggregator.feed_source(Source(str(path)), jobs=jobs)
    return aggregator


def test_split_reading_equals_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_parallel, "MIN_BYTES", 1 << 16)
    monkeypatch.setattr(_parallel, "_MIN_RANGE", 1 << 16)
    log = tmp_path / "big.jsonl"
    _write(log, 6000, bad_at=5000)  # the bad line is in the last of the ranges
    assert len(_parallel.ranges(str(log), 3)) == 3
    one, three = _run(log, 1).result(), _run(log, 3).result()
    assert three.inputs.files == one.inputs.files == 1
    assert three.inputs.lines == one.inputs.lines == 6000
    assert three.inputs.first_bad == one.inputs.first_bad == {
        str(log): (5000, "not a JSON object (truncated or binary?)")
    }
    assert [r.key for r in three.rows] == [r.key for r in one.rows]
    for a, b in zip(one.rows, three.rows, strict=True):
        assert (a.count, a.max_ms, a.p50_ms, a.p95_ms, a.p99_ms) == (
            b.count, b.max_ms, b.p50_ms, b.p95_ms, b.p99_ms
        )
        assert a.avg_ms == pytest.approx(b.avg_ms, rel=1e-12)
        assert a.breakdown_share == pytest.approx(b.breakdown_share)
        assert a.cache_hit_ratio == b.cache_hit_ratio
    assert three.retries == one.retries


def test_ranges_start_at_line_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_parallel, "_MIN_RANGE", 1)
    log = tmp_path / "a.jsonl"
    log.write_bytes(b"".join(b"x" * (i % 17) + b"\n" for i in range(500)))
    data = log.read_bytes()
    parts = _parallel.ranges(str(log), 4)
    assert parts[0][0] == 0
    assert parts[-1][1] == len(data)
    for (_, end), (start, _) in itertools.pairwise(parts):
        assert end == start
        assert data[start - 1 : start] == b"\n"


def test_merged_samples_stay_uniform() -> None:
    a, b = Sample(1000), Sample(1000)
    for i in range(30_000):
        a.add(float(i % 100))  # values 0..99
    for _ in range(10_000):
        b.add(1000.0)
    merged = _parallel.merge_samples(a, b)
    assert merged.seen == 40_000
    assert not merged.exact
    assert len(merged.values) == 1000
    # A quarter of the runs were 1000 ms: about a quarter of the sample is.
    share = sum(1 for v in merged.values if v == 1000.0) / 1000
    assert share == pytest.approx(0.25, abs=0.01)
    assert percentile(merged.sorted(), 50) < 100
