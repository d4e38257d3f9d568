"""``analyze`` on OTLP JSON written by a collector's file exporter gives the logs' table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rag_instrument as ri
from rag_instrument import _breakdown
from rag_instrument.analysis import analyze
from rag_instrument.cli.__main__ import main
from support.collector_file import write_collector_file
from support.otlp_receiver import OTLPReceiver


def _run_pipeline(requests: int) -> None:
    for i in range(requests):
        with ri.request_context(request_id=f"r-{i}"), ri.stage("search"):
            with ri.stage("retrieval"):
                with ri.stage("embedding"):
                    _breakdown.record("embedding", 2.0)
                _breakdown.record("vector", 5.0)
                _breakdown.record("db", 1.0)
            try:
                with ri.stage("generation"):
                    _breakdown.record("llm", 3.0)
                    if i % 4 == 0:
                        raise TimeoutError("model timed out")  # noqa: TRY301
            except TimeoutError:
                pass


def test_collector_file_gives_the_same_table_as_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "rag.jsonl"
    with OTLPReceiver() as receiver:
        ri.configure(
            exporter="otlp",
            otlp_endpoint=receiver.endpoint,
            log_file=str(log),
            budgets={"retrieval": 0.001},
        )
        _run_pipeline(8)
        ri.shutdown()
        assert receiver.wait_for_spans(32)
        spans_file = write_collector_file(list(receiver.trace_requests), tmp_path / "traces.json")

    first = json.loads(spans_file.read_text().splitlines()[0])
    some_span = first["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(some_span["traceId"]) == 32
    assert len(some_span["spanId"]) == 16
    assert isinstance(some_span["startTimeUnixNano"], str)

    from_log = {r.key: r for r in analyze([str(log)]).rows}
    from_spans = analyze([str(spans_file)])
    assert from_spans.kinds == {"otlp"}
    rows = {r.key: r for r in from_spans.rows}
    assert [(r.key, r.depth) for r in from_spans.rows] == [
        ("search", 0),
        ("retrieval", 1),
        ("embedding", 2),
        ("generation", 1),
    ]
    for name, row in rows.items():
        assert row.count == from_log[name].count == 8
        assert row.errors == from_log[name].errors
        # Span times and logged durations are read a few microseconds apart (and a run can
        # be preempted between the two readings on a busy machine): the medians agree.
        assert row.p50_ms == pytest.approx(from_log[name].p50_ms, abs=1.0)
        assert row.breakdown_ms == pytest.approx(from_log[name].breakdown_ms)
    assert rows["generation"].errors == 2
    assert rows["retrieval"].budget_ms == 0.001
    assert rows["retrieval"].over_budget == 8
    assert rows["search"].is_total

    # The command line reads it the same way; with the log of the same runs, each run once.
    assert main(["analyze", str(spans_file), str(log), "--format", "json"]) == 0
    merged = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert merged["retrieval"]["count"] == 8


def test_malformed_spans_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {
        "traceId": "0" * 31 + "1", "spanId": "0" * 15 + "1", "name": "retrieval",
        "startTimeUnixNano": "1000000000", "endTimeUnixNano": "1012500000",
        "attributes": [{"key": "rag.stage", "value": {"stringValue": "retrieval"}}],
        "status": {},
    }
    broken = {**good, "endTimeUnixNano": "soon"}
    line = {"resourceSpans": [{"scopeSpans": [{"spans": [good, broken]}]}]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(line) + "\n")
    assert main(["analyze", str(path), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert (row["stage"], row["count"], row["max_ms"]) == ("retrieval", 1, 12.5)
    assert "line 1: a span without start/end times" in err
    path.write_text(json.dumps(line) + "\n" + json.dumps({"resourceSpans": "oops"}) + "\n")
    assert main(["analyze", str(path), "--format", "json"]) == 0
    _, err = capsys.readouterr()
    assert "2 unusable line(s)" in err  # the broken span's line and this one


def test_routes_from_server_spans(tmp_path: Path) -> None:
    from rag_instrument.analysis import analyze

    def span(i: int, status: int) -> dict[str, object]:
        return {
            "traceId": f"{i:032x}", "spanId": f"{i:016x}", "name": "POST /api/search",
            "kind": 2, "startTimeUnixNano": "1000000000",
            "endTimeUnixNano": str(1_000_000_000 + (i + 1) * 10_000_000),
            "attributes": [
                {"key": "http.route", "value": {"stringValue": "/api/search"}},
                {"key": "http.request.method", "value": {"stringValue": "POST"}},
                {"key": "http.response.status_code", "value": {"intValue": str(status)}},
            ],
        }

    path = tmp_path / "traces.json"
    spans = [span(i, 503 if i == 0 else 200) for i in range(4)]
    path.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}) + "\n")
    (row,) = analyze([str(path)], by="route", budgets={"POST /api/search": 25.0}).rows
    assert (row.key, row.count, row.errors, row.max_ms) == ("POST /api/search", 4, 1, 40.0)
    assert row.statuses == {"2xx": 3, "5xx": 1}
    assert row.over_budget == 2


@pytest.mark.parametrize("order", ["spans first", "logs first"])
def test_spans_and_logs_of_the_same_runs_are_counted_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], order: str
) -> None:
    # The docs' "spans and logs together": a run in both (its line carries its span's id)
    # counted twice.
    log = tmp_path / "rag.jsonl"
    other = tmp_path / "other-service.jsonl"
    with OTLPReceiver() as receiver:
        ri.configure(exporter="otlp", otlp_endpoint=receiver.endpoint, log_file=str(log))
        _run_pipeline(4)
        ri.shutdown()
        assert receiver.wait_for_spans(16)
        spans_file = write_collector_file(list(receiver.trace_requests), tmp_path / "traces.json")
    ri.configure(exporter="none", log_file=str(other))
    for _ in range(3):
        with ri.stage("retrieval"):  # runs only in the logs: still counted
            pass
    ri.shutdown()
    inputs = [str(spans_file), str(log), str(other)]
    if order == "logs first":
        inputs.reverse()
    rows = {r.key: r for r in analyze(inputs).rows}
    assert rows["search"].count == 4
    assert rows["generation"].count == 4
    assert rows["retrieval"].count == 4 + 3
    assert main(["analyze", *inputs, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    counts = {row["stage"]: row["count"] for row in json.loads(out)}
    assert counts["search"] == 4
    assert "not counted again" in err


def _route_span(
    trace: int, span: int, parent: int | None, kind: int, start_ms: int, end_ms: int,
    route: str | None = "/api/search",
) -> dict[str, object]:
    attributes: list[dict[str, object]] = [
        {"key": "http.request.method", "value": {"stringValue": "POST"}},
        {"key": "http.response.status_code", "value": {"intValue": "200"}},
    ]
    if route is not None:
        attributes.append({"key": "http.route", "value": {"stringValue": route}})
    out: dict[str, object] = {
        "traceId": f"{trace:032x}", "spanId": f"{span:016x}", "name": "POST /api/search",
        "kind": kind, "startTimeUnixNano": str(start_ms * 1_000_000),
        "endTimeUnixNano": str(end_ms * 1_000_000), "attributes": attributes,
    }
    if parent is not None:
        out["parentSpanId"] = f"{parent:016x}"
    return out


def _scopes(**spans: list[dict[str, object]]) -> str:
    return json.dumps({"resourceSpans": [{"scopeSpans": [
        {"scope": {"name": name}, "spans": group} for name, group in spans.items()
    ]}]}) + "\n"


def test_a_request_traced_by_two_instrumentations_counts_once(tmp_path: Path) -> None:
    from rag_instrument.analysis import analyze

    # FastAPI's own telemetry in a trace of its own beside rag_instrument's request span.
    apart = tmp_path / "apart.json"
    apart.write_text(_scopes(
        fastapi=[_route_span(100 + i, 1000 + i, None, 2, i * 100, i * 100 + 20) for i in range(5)],
        rag_instrument=[_route_span(i, i + 1, None, 2, i * 100 + 1, i * 100 + 19) for i in range(5)],
    ))
    (row,) = analyze([str(apart)], by="route").rows
    assert (row.key, row.count, row.max_ms) == ("POST /api/search", 5, 18.0)
    # The OpenTelemetry ASGI middleware's server span around rag_instrument's, one trace.
    nested = tmp_path / "nested.json"
    nested.write_text(_scopes(**{
        "opentelemetry.instrumentation.asgi": [
            _route_span(i, 500 + i, None, 2, i * 100, i * 100 + 20) for i in range(5)
        ],
        "other": [_route_span(i, 600 + i, 500 + i, 1, i * 100 + 1, i * 100 + 19) for i in range(5)],
    }))
    (row,) = analyze([str(nested)], by="route").rows
    assert row.count == 5


def test_our_request_span_without_a_route_is_listed_as_no_route(tmp_path: Path) -> None:
    from rag_instrument.analysis import analyze

    path = tmp_path / "404.json"
    path.write_text(_scopes(rag_instrument=[_route_span(1, 2, None, 2, 0, 3, route=None)]))
    (row,) = analyze([str(path)], by="route").rows
    assert (row.key, row.count) == ("POST (no route)", 1)


@pytest.mark.parametrize("ours_first", [True, False])
@pytest.mark.parametrize("jobs", [1, 2])
def test_route_counts_do_not_depend_on_order_or_jobs(
    tmp_path: Path,
    ours_first: bool,
    jobs: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rag_instrument.analysis import _parallel
    from rag_instrument.cli.__main__ import main

    monkeypatch.setattr(_parallel, "MIN_BYTES", 1)  # split even a small file between jobs
    monkeypatch.setattr(_parallel, "_MIN_RANGE", 1)

    # Each instrumentation exports its own batches (one collector line each): 30 requests.
    ours = [
        _scopes(rag_instrument=[
            _route_span(i, i + 1, None, 2, i * 100 + 1, i * 100 + 19) for i in range(b, b + 10)
        ])
        for b in (0, 10, 20)
    ]
    theirs = [
        _scopes(fastapi=[
            _route_span(900 + i, 9000 + i, None, 2, i * 100, i * 100 + 20)
            for i in range(b, b + 10)
        ])
        for b in (0, 10, 20)
    ]
    path = tmp_path / "traces.json"
    path.write_text("".join(ours + theirs if ours_first else theirs + ours))
    args = ["analyze", str(path), "--by", "route", "--jobs", str(jobs), "--format", "json"]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["count"] == 30


def test_route_counts_stay_once_per_request_past_the_hold_back_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rag_instrument.analysis import _otlp, analyze

    monkeypatch.setattr(_otlp, "_MAX_FOREIGN", 5)  # fewer held back than come first
    theirs = _scopes(fastapi=[
        _route_span(900 + i, 9000 + i, None, 2, i * 100, i * 100 + 20) for i in range(20)
    ])
    ours = _scopes(rag_instrument=[
        _route_span(i, i + 1, None, 2, i * 100 + 1, i * 100 + 19) for i in range(20)
    ])
    path = tmp_path / "traces.json"
    path.write_text(theirs + ours)
    (row,) = analyze([str(path)], by="route").rows
    assert row.count == 20


def test_route_budgets_are_read_from_request_spans(tmp_path: Path) -> None:
    # Our request spans say which budget they exceeded, as stage spans do: --by route on a
    # collector's file shows it without --budget, as it does from the JSON lines.
    from rag_instrument.analysis import analyze

    spans = []
    for i in range(4):
        span = _route_span(i + 1, i + 1, None, 2, i * 100, i * 100 + (30 if i < 3 else 10))
        if i < 3:
            span["attributes"] = [  # type: ignore[index]
                *span["attributes"],  # type: ignore[misc]
                {"key": "rag.budget.exceeded", "value": {"boolValue": True}},
                {"key": "rag.budget.ms", "value": {"doubleValue": 25.0}},
            ]
        spans.append(span)
    path = tmp_path / "budgets.json"
    path.write_text(_scopes(rag_instrument=spans))
    result = analyze([str(path)], by="route")
    (row,) = result.rows
    assert (row.key, row.budget_ms, row.over_budget) == ("POST /api/search", 25.0, 3)
    from rag_instrument.analysis._render import render_table

    table = render_table(result, colour=False)
    budget_table = table[table.index("Budget exceeded") :]
    assert budget_table.splitlines()[1].split()[0] == "route"


@pytest.mark.parametrize("ms", [{"stringValue": "61.5"}, {"arrayValue": {}}, {}])
def test_a_breakdown_value_of_the_wrong_type_does_not_stop_the_analysis(
    tmp_path: Path, ms: dict[str, object]
) -> None:
    from rag_instrument.analysis import analyze

    def value(v: object) -> dict[str, object]:
        return {"doubleValue": v} if isinstance(v, float) else {"boolValue": v}

    span = _route_span(1, 1, None, 1, 0, 100, route=None)
    span["attributes"] = [
        {"key": "rag.stage", "value": {"stringValue": "retrieval"}},
        {"key": "rag.breakdown.db.ms", "value": ms},
        {"key": "rag.breakdown.vector.ms", "value": value(9.0)},
        {"key": "rag.budget.exceeded", "value": value(True)},
        {"key": "rag.budget.ms", "value": value(8.0)},
    ]
    path = tmp_path / "bad.json"
    path.write_text(_scopes(rag_instrument=[span]))
    result = analyze([str(path)])
    (row,) = result.rows
    assert (row.key, row.count) == ("retrieval", 1)
    assert result.budget_exceeded[0]["largest"] == {"vector": 1}
