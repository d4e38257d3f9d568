"""``rag-instrument analyze``: inputs, figures, grouping, budgets, formats and bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_instrument.analysis import analyze, percentile
from rag_instrument.analysis._render import use_colour
from rag_instrument.analysis._stats import Sample
from rag_instrument.cli.__main__ import main


def line(stage: str, ms: Any, ts: str = "2026-11-25T15:33:19.000000Z", **extra: Any) -> str:
    record: dict[str, Any] = {
        "timestamp": ts,
        "level": extra.pop("level", "info"),
        "event": f"{stage} completed",
        "logger": "rag_instrument",
        "context": {"pipeline_stage": stage, "request_id": "r-1"},
        "execution_time_ms": ms,
    }
    record.update(extra)
    return json.dumps(record)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{x}\n" for x in lines))
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["analyze", *args])
    out, err = capsys.readouterr()
    return status, out, err


def run_cli_command(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def as_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    status, out, _ = run_cli([*args, "--format", "json"], capsys)
    assert status == 0
    return {row.get("stage") or row.get("event") or row.get("route"): row for row in json.loads(out)}


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_help_prints_single_percent_signs(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse does not %-format descriptions and epilogs, so "%%" would print as is.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "%%" not in out
    assert "at least p% of runs at or below it" in out


def nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    k = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[k - 1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=60))
def test_figures_are_exact_nearest_rank(values: list[float]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = write(Path(tmp) / "a.jsonl", [line("retrieval", v) for v in values])
        (row,) = analyze([str(log)]).rows
    assert row.count == len(values)
    assert row.avg_ms == pytest.approx(sum(values) / len(values))
    assert row.max_ms == max(values)
    for pct, got in ((50, row.p50_ms), (95, row.p95_ms), (99, row.p99_ms)):
        assert got == nearest_rank(values, pct)


def test_table_json_and_csv_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write(
        tmp_path / "a.jsonl",
        [line("retrieval", float(v)) for v in range(1, 101)]
        + [line("generation", 10.0), line("generation", 30.0, level="error", error_type="E")],
    )
    rows = as_json([str(log)], capsys)
    assert rows["retrieval"]["count"] == 100
    assert rows["retrieval"]["p95_ms"] == 95.0
    assert rows["retrieval"]["p99_ms"] == 99.0
    assert rows["generation"]["errors"] == 1
    assert rows["generation"]["avg_time"] == 20.0
    assert rows["generation"]["max_time"] == 30.0

    status, out, _ = run_cli([str(log), "--format", "csv"], capsys)
    assert status == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["stage"] for r in table] == ["retrieval", "generation"]
    assert float(table[0]["p95_ms"]) == 95.0

    status, out, _ = run_cli([str(log)], capsys)
    assert status == 0
    header, _rule, first, second = out.splitlines()[:4]
    assert header.split()[:3] == ["stage", "runs", "errors"]
    assert "\x1b[" not in out  # not a terminal: no colour
    assert first.split()[:3] == ["retrieval", "100", "0"]
    assert second.split()[:3] == ["generation", "2", "1"]
    # Aligned: the numbers end where their column's header ends.
    assert first.index("100") + 3 == header.index("runs") + 4


def test_inputs_globs_gzip_stdin_and_several_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "host-a.jsonl", [line("retrieval", 10.0)] * 3)
    with gzip.open(tmp_path / "host-b.jsonl.gz", "wt") as handle:
        handle.write(line("retrieval", 20.0) + "\n")
    rows = as_json([str(tmp_path / "host-*")], capsys)
    assert rows["retrieval"]["count"] == 4
    assert rows["retrieval"]["max_ms"] == 20.0

    # A gzip file is recognised by its content, whatever its name.
    plain_name = tmp_path / "rotated.log"
    plain_name.write_bytes(gzip.compress((line("rerank", 5.0) + "\n").encode()))
    assert as_json([str(plain_name)], capsys)["rerank"]["count"] == 1

    stdin = io.TextIOWrapper(io.BytesIO((line("generation", 7.0) + "\n").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    rows = as_json(["-", str(tmp_path / "host-a.jsonl")], capsys)
    assert rows["generation"]["count"] == 1
    assert rows["retrieval"]["count"] == 3


def test_streams_without_reading_the_file_whole(tmp_path: Path) -> None:
    # Lines cross the 1 MiB block boundaries; every one must be counted once.
    values = [float(i % 97) for i in range(30_000)]
    log = write(tmp_path / "big.jsonl", [line("retrieval", v, pad="x" * (i % 113)) for i, v in
                                         enumerate(values)])
    assert log.stat().st_size > 3 << 20
    (row,) = analyze([str(log)]).rows
    assert row.count == len(values)
    assert row.avg_ms == pytest.approx(sum(values) / len(values))


def test_bad_input_is_counted_and_named_never_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = line("retrieval", 10.0)
    log = tmp_path / "messy.jsonl"
    log.write_bytes(
        "\n".join(
            [
                good,
                good[:40],  # truncated
                "not json at all",
                line("retrieval", "12"),  # wrong type
                good.replace("10.0", "NaN"),  # not JSON
                line("retrieval", -5.0),  # negative
                line("retrieval", True),  # a bool is not a duration
                good,
            ]
        ).encode()
        + b"\n\x00\xff\xfe binary \x89PNG\n"
        + good.encode()
        + b"\n"
    )
    status, out, err = run_cli(
        [str(log), str(tmp_path / "missing.jsonl"), "--format", "json"], capsys
    )
    assert status == 0
    (row,) = json.loads(out)
    assert row["count"] == 3
    assert row["avg_time"] == 10.0
    assert "7 unusable line(s)" in err
    assert f"first in {log}, line 2:" in err
    assert "cannot read" in err
    assert "missing.jsonl" in err


@pytest.mark.parametrize("by", ["stage", "event"])  # chunked and line by line
def test_a_truncated_gzip_counts_what_came_before_and_names_the_break(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], by: str
) -> None:
    # Incompressible padding makes the file span several read blocks.
    rows = [line("retrieval", 10.0, pad=os.urandom(700).hex()) for _ in range(3000)]
    data = gzip.compress("".join(f"{row}\n" for row in rows).encode())
    log = tmp_path / "cut.jsonl.gz"
    log.write_bytes(data[: len(data) // 2])
    status, out, err = run_cli([str(log), "--by", by, "--format", "json"], capsys)
    assert status == 0
    (row,) = json.loads(out)
    assert 0 < row["count"] < 3000
    assert f"{log}: read failed after {'byte' if by == 'stage' else 'line'} " in err


def test_nothing_readable_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli([str(tmp_path / "nope.jsonl"), str(tmp_path / "*.none")], capsys)
    assert status == 2
    assert out == ""
    (only,) = err.splitlines()
    assert only.startswith("rag-instrument: nothing could be read (")
    assert "nope.jsonl: No such file or directory" in only
    assert "*.none: no such file" in only


def test_a_corrupt_gzip_as_the_only_input_is_nothing_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not "the input is empty" with exit 0: a CI gate on budgets would pass on nothing.
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"\x1f\x8bgarbage")
    good = write(tmp_path / "a.jsonl", [line("retrieval", 10.0)])
    status, out, err = run_cli([str(fake), "--budget", "retrieval=1", "--fail-on-budget"], capsys)
    assert (status, out) == (2, "")
    assert err.startswith("rag-instrument: nothing could be read (")
    assert "fake.jsonl.gz" in err
    for args in ([str(fake), str(good)], [str(good), str(fake), "--allow-missing"]):
        status, _, err = run_cli_command(["compare", *args, "--fail-on-regression", "10"], capsys)
        assert status == 2, err
    # Beside a readable input it is named, and the rest is analysed.
    status, out, err = run_cli([str(good), str(fake), "--format", "json"], capsys)
    assert status == 0
    assert [row["stage"] for row in json.loads(out)] == ["retrieval"]
    assert f"cannot read {fake}:" in err


def test_a_budget_that_names_no_stage_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write(tmp_path / "a.jsonl", [line("retrieval", 10.0)])
    status, _, err = run_cli(
        [str(log), "--budget", "retreival=1", "--budget", "POST /api/x=5", "--fail-on-budget"],
        capsys,
    )
    assert status == 0
    assert err.splitlines() == [
        "rag-instrument: the budget for 'retreival' names no stage in the input"
    ]


def test_an_empty_input_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    status, out, _ = run_cli([str(empty)], capsys)
    assert status == 0
    assert "the input is empty" in out
    status, out, err = run_cli([str(empty), "--format", "json"], capsys)
    assert (status, json.loads(out)) == (0, [])
    assert "the input is empty" in err  # said aside: the output stays JSON
    status, out, err = run_cli([str(empty), "--format", "csv"], capsys)
    assert status == 0
    assert out.startswith("stage,")
    assert "the input is empty" in err


def test_pipeline_order_nesting_and_the_whole_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    import rag_instrument as ri

    def work() -> None:
        time.sleep(0.003)  # stages that take time, as real ones do (not for ordering)

    log = tmp_path / "rag.jsonl"
    ri.configure(exporter="memory", log_file=str(log))
    for _ in range(5):
        with ri.stage("search"):
            with ri.stage("custom_guardrail"):
                work()
            with ri.stage("generation"):
                work()
            with ri.stage("retrieval"):
                with ri.stage("embedding"):
                    work()
                work()
            with ri.stage("query_rewriting"):
                work()
    ri.shutdown()
    result = analyze([str(log)])
    assert [(r.key, r.depth) for r in result.rows] == [
        ("search", 0),
        ("query_rewriting", 1),
        ("retrieval", 1),
        ("embedding", 2),
        ("generation", 1),
        ("custom_guardrail", 1),
    ]
    assert [r.key for r in result.rows if r.is_total] == ["search"]
    _, out, _ = run_cli([str(log)], capsys)
    assert "search (whole request)" in out
    assert "\n    embedding " in out


def test_by_event_and_by_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def request(method: str, route: str, status: int, ms: float) -> str:
        return json.dumps({
            "timestamp": "2026-11-25T15:33:19.000000Z", "level": "info",
            "event": "request completed", "logger": "rag_instrument",
            "context": {"request_id": "r"}, "method": method, "route": route,
            "status": status, "execution_time_ms": ms,
        })

    log = write(
        tmp_path / "web.jsonl",
        [
            request("POST", "/api/search", 200, 100.0),
            request("POST", "/api/search", 200, 300.0),
            request("POST", "/api/search", 503, 50.0),
            request("GET", "/health", 200, 1.0),
            line("retrieval", 40.0),
        ],
    )
    routes = as_json([str(log), "--by", "route", "--budget", "POST /api/search=200"], capsys)
    assert set(routes) == {"POST /api/search", "GET /health"}
    search = routes["POST /api/search"]
    assert (search["count"], search["errors"], search["over_budget"]) == (3, 1, 1)
    assert search["statuses"] == {"2xx": 2, "5xx": 1}
    events = as_json([str(log), "--by", "event"], capsys)
    assert events["request completed"]["count"] == 4
    assert events["retrieval completed"]["count"] == 1


def test_by_event_does_not_count_budget_warnings_as_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import rag_instrument as ri

    log = tmp_path / "rag.jsonl"
    ri.configure(exporter="memory", log_file=str(log), budgets={"retrieval": 0.001})
    for _ in range(3):
        with ri.stage("retrieval"):
            sum(range(10_000))  # well over a microsecond
    ri.shutdown()
    assert log.read_text().count('"budget exceeded"') == 3  # the warnings are there
    events = as_json([str(log), "--by", "event"], capsys)
    assert set(events) == {"retrieval completed"}  # ... but they are not runs of an event
    assert events["retrieval completed"]["count"] == 3


def test_budgets_from_flags_toml_and_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = [float(v) for v in range(1, 21)]  # p95 = 19
    log = write(
        tmp_path / "a.jsonl",
        [line("retrieval", v) for v in values]
        + [line("generation", v) for v in values]
        + [json.dumps({"event": "budget exceeded", "logger": "rag_instrument",
                       "stage": "generation", "budget_ms": 15.0,
                       "execution_time_ms": 16.0, "largest": {"kind": "llm", "ms": 12.0}})],
    )
    toml = tmp_path / "budgets.toml"
    toml.write_text("[budgets]\nretrieval = 18\n")
    rows = as_json([str(log), "--budgets", str(toml)], capsys)
    assert (rows["retrieval"]["budget_ms"], rows["retrieval"]["over_budget"]) == (18.0, 2)
    # Without a flag, the log's own "budget exceeded" lines tell the budget.
    assert (rows["generation"]["budget_ms"], rows["generation"]["over_budget"]) == (15.0, 5)
    status, out, _ = run_cli([str(log), "--budgets", str(toml)], capsys)
    assert "2 of 20 over 18 ms" in out
    assert "5 of 20 over 15 ms" in out
    # --budget wins over the file; --fail-on-budget is the CI gate on p95.
    status, _, err = run_cli([str(log), "--budgets", str(toml), "--budget", "retrieval=19",
                              "--budget", "generation=19", "--fail-on-budget"], capsys)
    assert status == 0, err
    status, _, err = run_cli([str(log), "--budget", "retrieval=18.5", "--fail-on-budget"], capsys)
    assert status == 1
    assert "retrieval p95 19.0 ms is over its budget of 18.5 ms" in err


def test_budget_table_without_a_largest_part_is_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "budget exceeded" lines without a breakdown (nothing measured inside the stage) and
    # with one: the table reads "10 with no breakdown", never a bare "- 10".
    exceeded = [
        json.dumps({"event": "budget exceeded", "logger": "rag_instrument", "stage": stage,
                    "budget_ms": 1.0, "execution_time_ms": 2.0, **extra})
        for stage, extra, times in [
            ("retrieval", {}, 10),
            ("generation", {"largest": {"kind": "llm", "ms": 1.5}}, 2),
            ("generation", {}, 1),
        ]
        for _ in range(times)
    ]
    log = write(tmp_path / "a.jsonl", [line("retrieval", 2.0), line("generation", 2.0), *exceeded])
    status, out, _ = run_cli([str(log)], capsys)
    assert status == 0
    table = out[out.index("Budget exceeded"):]
    rows = {r.split()[0]: " ".join(r.split()[1:]) for r in table.splitlines()[3:] if r.strip()}
    assert rows["retrieval"] == "10 10 with no breakdown"
    assert rows["generation"] == "3 llm 2, 1 with no breakdown"
    assert "- 10" not in out
    assert "- 1" not in table


def test_bad_budgets_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write(tmp_path / "a.jsonl", [line("retrieval", 1.0)])
    bad = tmp_path / "b.toml"
    bad.write_text('retrieval = "fast"\n')
    status, _, err = run_cli([str(log), "--budgets", str(bad)], capsys)
    assert status == 2
    assert "budget for 'retrieval' must be a positive number" in err
    both = tmp_path / "both.toml"  # top-level pairs and a [budgets] table: all of them
    both.write_text("retrieval = 0.5\n[budgets]\ngeneration = 60\n")
    log2 = write(tmp_path / "b.jsonl", [line("retrieval", 1.0), line("generation", 1.0)])
    status, out, _ = run_cli([str(log2), "--budgets", str(both), "--format", "json"], capsys)
    assert status == 0
    by_stage = {row["stage"]: row["budget_ms"] for row in json.loads(out)}
    assert by_stage == {"retrieval": 0.5, "generation": 60.0}
    for value in ("inf", "nan"):  # as configure() and --budget refuse them
        bad.write_text(f"retrieval = {value}\n")
        status, _, err = run_cli([str(log), "--budgets", str(bad)], capsys)
        assert status == 2
        assert "budget for 'retrieval' must be a positive number" in err
    bad.write_text("retrieval = [\n")
    status, _, err = run_cli([str(log), "--budgets", str(bad)], capsys)
    assert (status, "not valid TOML" in err) == (2, True)
    with pytest.raises(SystemExit):
        main(["analyze", str(log), "--budget", "retrieval"])
    assert "STAGE=MS" in capsys.readouterr().err


def test_since_and_until(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write(
        tmp_path / "a.jsonl",
        [
            line("retrieval", 1.0, ts="2026-11-25T10:00:00.000000Z"),
            line("retrieval", 2.0, ts="2026-11-25T11:00:00.000000Z"),
            line("retrieval", 3.0, ts="2026-11-25T12:00:00+00:00"),
            line("retrieval", 4.0, ts="2026-11-25T13:00:00.000000Z"),
        ],
    )
    rows = as_json([str(log), "--since", "2026-11-25T11:00Z", "--until", "2026-11-25T13:00Z"],
                   capsys)
    assert (rows["retrieval"]["count"], rows["retrieval"]["avg_ms"]) == (2, 2.5)
    with pytest.raises(SystemExit):
        main(["analyze", str(log), "--since", "yesterday"])
    assert "ISO 8601" in capsys.readouterr().err
    # A window that holds no time is a mistake, not "no stage runs found".
    status, _, err = run_cli(
        [str(log), "--since", "2027-01-01T00:00Z", "--until", "2026-01-01T00:00Z"], capsys
    )
    assert status == 2
    assert "--since must be before --until" in err


def test_colour_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Tty())
    assert not use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Tty())


def test_table_is_red_over_budget_on_a_terminal(tmp_path: Path) -> None:
    from rag_instrument.analysis._render import render_table

    log = write(tmp_path / "a.jsonl", [line("retrieval", 100.0), line("rerank", 1.0)])
    out = render_table(analyze([str(log)], budgets={"retrieval": 50.0}), colour=True)
    (red,) = [x for x in out.splitlines() if x.startswith("\x1b[31m")]
    assert "retrieval" in red


def test_percentiles_beyond_the_memory_bound_come_from_a_uniform_sample() -> None:
    sample = Sample(max_values=1000)
    for i in range(100_000):
        sample.add(float(i))
    assert not sample.exact
    assert len(sample.values) == 1000
    # A uniform sample of 1000: p95's rank error is about sqrt(.95*.05/1000) = 0.7 points.
    assert percentile(sample.sorted(), 95) == pytest.approx(95_000, abs=3_000)
    assert percentile(sample.sorted(), 50) == pytest.approx(50_000, abs=5_000)


def test_beyond_the_bound_counts_and_means_stay_exact(tmp_path: Path) -> None:
    values = [float(i) for i in range(500)]
    log = write(tmp_path / "a.jsonl", [line("retrieval", v) for v in values])
    (row,) = analyze([str(log)], max_values=50, budgets={"retrieval": 449.5}).rows
    assert not row.exact
    assert (row.count, row.max_ms, row.over_budget) == (500, 499.0, 50)
    assert row.avg_ms == pytest.approx(249.5)


def test_help_states_the_percentile_method_and_memory_bound() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).with_name("rag-instrument")), "analyze", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    flat = " ".join(out.split())
    assert "nearest-rank" in flat
    assert "1,000,000 runs per group" in flat
    assert "NO_COLOR" in flat


def test_a_reader_that_goes_away_is_not_an_error(tmp_path: Path) -> None:
    log = write(tmp_path / "a.jsonl", [line("retrieval", 1.0)])
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` having exited: every write gets EPIPE
    try:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("rag-instrument")), "analyze", str(log)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert "Traceback" not in result.stderr


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=40), st.booleans())
def test_any_bytes_are_read_without_an_error(chunks: list[bytes], gzipped: bool) -> None:
    import tempfile

    good = line("retrieval", 5.0).encode()
    data = b"\n".join([good, *chunks, good]) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.log"
        path.write_bytes(gzip.compress(data) if gzipped else data)
        result = analyze([str(path)])
    assert result.inputs.files == 1
    assert result.inputs.lines == data.count(b"\n")
    rows = {r.key: r for r in result.rows}
    # The two good lines always count; a random line may be another (valid) run.
    assert rows["retrieval"].count >= 2
    assert result.inputs.bad_lines <= len(chunks) + data.count(b"\n")


def test_since_and_until_on_spans(tmp_path: Path) -> None:
    def span(end_s: int) -> dict[str, Any]:
        return {
            "traceId": "0" * 32, "spanId": f"{end_s:016x}", "name": "retrieval",
            "startTimeUnixNano": str(end_s * 10**9 - 5 * 10**6),
            "endTimeUnixNano": str(end_s * 10**9),
            "attributes": [{"key": "rag.stage", "value": {"stringValue": "retrieval"}}],
        }

    t0 = 1_764_000_000
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(
        {"resourceSpans": [{"scopeSpans": [{"spans": [span(t0), span(t0 + 60), span(t0 + 120)]}]}]}
    ) + "\n")
    (row,) = analyze([str(path)], since=t0 + 30, until=t0 + 90).rows
    assert row.count == 1
    assert row.max_ms == pytest.approx(5.0)


@pytest.mark.parametrize("kept", [0.3, 0.5, 0.9])
def test_a_cut_gzip_keeps_every_whole_line_before_the_cut(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kept: float
) -> None:
    # A rotated log copied while it was written: gzip.GzipFile lost the lines of its last
    # read (up to 1 MiB of them) and named a whole line as broken.
    import random
    import zlib

    rng = random.Random(7)
    body = "".join(
        line("retrieval", round(rng.uniform(1, 500), 3), request=f"{rng.random():.17f}") + "\n"
        for _ in range(8000)
    ).encode()
    packed = gzip.compress(body)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed[: int(len(packed) * kept)])
    recoverable = zlib.decompressobj(31).decompress(cut.read_bytes())  # what zcat shows
    whole = recoverable.count(b"\n")
    status, out, err = run_cli([str(cut), "--format", "json"], capsys)
    assert status == 0
    (row,) = json.loads(out)
    assert row["count"] == whole
    assert "read failed" in err  # the cut is said once
    assert "not valid JSON" not in err  # and no whole line is called broken
    assert "unusable" not in err


def test_gzip_members_padding_and_corruption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = gzip.compress((line("retrieval", 1.0) + "\n").encode())
    second = gzip.compress((line("retrieval", 3.0) + "\n").encode())
    padded = tmp_path / "padded.gz"
    padded.write_bytes(first + b"\0" * 1000 + second + b"\0" * 10)
    rows = as_json([str(padded)], capsys)
    assert (rows["retrieval"]["count"], rows["retrieval"]["avg_ms"]) == (2, 2.0)
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(first + b"\x1f\x8bnot deflate at all")
    status, out, err = run_cli([str(corrupt), "--format", "json"], capsys)
    assert status == 0
    assert json.loads(out)[0]["count"] == 1
    assert "read failed" in err


def test_a_huge_line_is_one_unusable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A 40 MB line (over the 16 MiB limit) was reported as 3 unusable lines.
    log = tmp_path / "huge.jsonl"
    with log.open("w") as handle:
        handle.write(line("retrieval", 1.0) + "\n")
        handle.write('{"event": "' + "x" * (40 << 20) + '"}\n')
        handle.write(line("retrieval", 3.0) + "\n")
    for extra in ([], ["--since", "2020-01-01T00:00Z"]):  # both readers
        status, out, err = run_cli([str(log), "--format", "json", *extra], capsys)
        assert status == 0
        assert json.loads(out)[0]["count"] == 2
        assert "1 unusable line(s)" in err
        assert "line 2: line too long" in err


@pytest.mark.parametrize("stage", [123, {"a": 1}, ["retrieval"]])
def test_a_stage_that_is_not_a_string_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: Any
) -> None:
    record = json.loads(line("retrieval", 2.0))
    record["context"]["pipeline_stage"] = stage
    log = write(tmp_path / "a.jsonl", [line("retrieval", 1.0), json.dumps(record)])
    status, out, err = run_cli([str(log), "--format", "json"], capsys)
    assert status == 0
    assert json.loads(out)[0]["count"] == 1
    assert "line 2: context.pipeline_stage is not a string" in err


def test_a_byte_order_mark_does_not_cost_the_first_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "bom.jsonl"
    log.write_bytes(b"\xef\xbb\xbf" + f"{line('retrieval', 1.0)}\n{line('retrieval', 3.0)}\n".encode())
    packed = tmp_path / "bom.jsonl.gz"
    packed.write_bytes(gzip.compress(log.read_bytes()))
    for path in (log, packed):
        for extra in ([], ["--since", "2020-01-01T00:00Z"]):
            status, out, err = run_cli([str(path), "--format", "json", *extra], capsys)
            assert status == 0
            assert json.loads(out)[0]["count"] == 2, (path, extra)
            assert "unusable" not in err


def test_a_pipe_is_read_once_and_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Looking into an input for spans must not eat a pipe's first bytes.
    import threading

    body = "".join(f"{line('retrieval', float(n % 7))}\n" for n in range(3000)).encode()
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with fifo.open("wb") as handle:
            handle.write(body)

    writer = threading.Thread(target=feed)
    writer.start()
    status, out, err = run_cli([str(fifo), "--format", "json"], capsys)
    writer.join()
    assert status == 0
    assert json.loads(out)[0]["count"] == 3000
    assert "unusable" not in err


def test_a_trace_of_thousands_of_runs_nests_and_its_waterfall_holds_them(
    tmp_path: Path,
) -> None:
    # A batch job under one trace id: one request holding 3,000 embedding runs, each in
    # one of 30 retrieval runs (found by a search, not a pass over every run per run).
    lines = []
    base = 1_764_000_000.0
    def line(stage: str, start_ms: float, ms: float) -> str:
        end = base + (start_ms + ms) / 1000.0
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end))
        stamp += f".{int((end % 1) * 1e6):06d}Z"
        return json.dumps({
            "timestamp": stamp, "level": "info", "event": f"{stage} completed",
            "trace_id": "ab" * 16, "context": {"pipeline_stage": stage},
            "execution_time_ms": ms,
        })
    for r in range(30):
        r_start = r * 1000.0
        for e in range(100):
            lines.append(line("embedding", r_start + 10 + e * 9, 8.0))
        lines.append(line("retrieval", r_start, 990.0))
    lines.append(line("search", -5.0, 30_010.0))
    log = tmp_path / "batch.jsonl"
    log.write_text("\n".join(lines) + "\n")
    result = analyze([str(log)], details=True)
    assert [(r.key, r.depth, r.count) for r in result.rows] == [
        ("search", 0, 1), ("retrieval", 1, 30), ("embedding", 2, 3000),
    ]
    (waterfall,) = result.waterfalls
    depths = Counter(stage for stage, _start, _ms, depth in waterfall.stages if depth == 2)
    assert depths == {"embedding": 3000}


def test_sampled_percentiles_are_marked_on_their_row(tmp_path: Path) -> None:
    from rag_instrument.analysis._render import render_table

    sampled = write(tmp_path / "a.jsonl", [line("retrieval", float(i)) for i in range(500)])
    exact = write(tmp_path / "b.jsonl", [line("generation", float(i)) for i in range(10)])
    table = render_table(analyze([str(sampled), str(exact)], max_values=50))
    rows = {row.split()[0]: row for row in table.splitlines()[2:4]}
    assert rows["retrieval"].count("~") == 3  # p50, p95, p99 over the sample
    assert "~" not in rows["generation"]
    assert "~: percentiles over a uniform sample" in table


def test_control_characters_from_the_log_are_shown_escaped(tmp_path: Path) -> None:
    from rag_instrument.analysis._render import render_table

    log = write(tmp_path / "a.jsonl", [line("evil\x1b[31mRED\nline", 3.0)])
    table = render_table(analyze([str(log)]))
    assert "\x1b" not in table
    assert "evil\\x1b[31mRED\\x0aline" in table


def _parents_by_every_pair(traces: dict[str, list[tuple[str, float, float]]]) -> dict[str, str]:
    """The reference: for each run, a pass over every other run (the narrowest holder)."""
    votes: dict[str, Counter[str | None]] = {}
    for runs in traces.values():
        for stage, start, end in runs:
            best: tuple[float, str] | None = None
            slack = max(0.05, min(0.5, (end - start) / 2))
            for other, o_start, o_end in runs:
                holds = other != stage and o_start <= start + slack and end <= o_end
                if holds and (best is None or o_end - o_start < best[0]):
                    best = (o_end - o_start, other)
            votes.setdefault(stage, Counter())[best[1] if best else None] += 1
    out = {}
    for stage, counter in votes.items():
        parent, n = counter.most_common(1)[0]
        if parent is not None and n * 2 > sum(counter.values()):
            out[stage] = parent
    for stage in list(out):  # a cycle is no nesting at all
        seen, node = {stage}, out.get(stage)
        while node is not None:
            if node in seen:
                out.pop(stage, None)
                break
            seen.add(node)
            node = out.get(node)
    return out


_stage_runs = st.lists(
    st.tuples(
        st.sampled_from(["search", "retrieval", "embedding", "llm", "rerank"]),
        st.floats(0, 100, allow_nan=False),
        st.floats(0, 100, allow_nan=False),
    ).map(lambda r: (r[0], min(r[1], r[2]), max(r[1], r[2]))),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_stage_runs, min_size=1, max_size=3))
def test_nesting_matches_a_pass_over_every_pair(traces: list[list[tuple[str, float, float]]]) -> None:
    from rag_instrument.analysis._nesting import parents_from_intervals

    by_trace = {f"t{i}": runs for i, runs in enumerate(traces)}
    assert parents_from_intervals(by_trace) == _parents_by_every_pair(by_trace)


def test_a_waterfall_puts_a_run_in_the_narrowest_run_around_it() -> None:
    from rag_instrument.analysis._nesting import waterfalls

    runs = [
        ("search", 0.0, 500.0), ("retrieval", 10.0, 60.0), ("retrieval", 11.0, 400.0),
        ("embedding", 12.0, 30.0), ("embedding", 100.0, 150.0),
    ]
    (waterfall,) = waterfalls([(500.0, "t", runs)], {"embedding": "retrieval", "retrieval": "search"})
    assert waterfall.stages == [
        ("search", 0.0, 500.0, 0), ("retrieval", 10.0, 50.0, 1), ("embedding", 12.0, 18.0, 2),
        ("retrieval", 11.0, 389.0, 1), ("embedding", 100.0, 50.0, 2),
    ]


def test_lines_with_escaped_lone_surrogates_count_as_jq_counts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Valid JSON text (Python's json.dumps writes it for surrogate-escaped text; jq reads
    # it) that orjson refuses: it was reported as not JSON and left out of the figures.
    path = tmp_path / "log.jsonl"
    lines = [
        {"event": "retrieval completed", "context": {"pipeline_stage": "retrieval"},
         "execution_time_ms": 3},
        {"event": "retrieval completed", "context": {"pipeline_stage": "retrieval",
         "q": "bad \udc80"}, "execution_time_ms": 5},
        {"event": "odd\udc80 completed", "context": {"pipeline_stage": "odd\udc80"},
         "execution_time_ms": 1},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["analyze", str(path), "--format", "json"]) == 0
    rows = {row["stage"]: row for row in json.loads(capsys.readouterr().out)}
    assert (rows["retrieval"]["avg_time"], rows["retrieval"]["max_time"]) == (4.0, 5.0)
    assert rows["odd\ufffd"]["count"] == 1
    assert main(["analyze", str(path)]) == 0
    assert "odd\ufffd" in capsys.readouterr().out


def test_json_names_the_budget_and_its_violations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write(tmp_path / "a.jsonl", [line("retrieval", float(v)) for v in (10, 20, 30, 40)])
    rows = as_json([str(log), "--budget", "retrieval=25"], capsys)
    row = rows["retrieval"]
    assert (row["budget"], row["violations"]) == (25.0, 2)
    assert (row["budget_ms"], row["over_budget"]) == (25.0, 2)
    log2 = write(tmp_path / "b.jsonl", [line("generation", 1.0)])
    row = as_json([str(log2)], capsys)["generation"]
    assert (row["budget"], row["violations"]) == (None, None)
