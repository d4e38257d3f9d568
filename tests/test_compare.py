"""``rag-instrument compare``: percentiles before and after, and whether it is beyond noise."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_instrument.analysis import mann_whitney_u
from rag_instrument.cli.__main__ import main


def _log(path: Path, stages: dict[str, list[float]]) -> Path:
    lines = []
    for stage, values in stages.items():
        for ms in values:
            lines.append(json.dumps({
                "timestamp": "2026-11-25T15:33:19.000000Z", "level": "info",
                "event": f"{stage} completed", "logger": "rag_instrument",
                "context": {"pipeline_stage": stage}, "execution_time_ms": ms,
            }))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mann_whitney_matches_the_textbook_value() -> None:
    # Completely separated samples of 10: U = 0; with the continuity correction the
    # asymptotic two-sided p-value is 2 * (1 - Phi(49.5 / sqrt(175))) = 0.000183.
    p = mann_whitney_u([float(i) for i in range(1, 11)], [float(i) for i in range(11, 21)])
    assert p == pytest.approx(0.000183, abs=2e-6)
    # Ties: all equal values are no evidence of a difference.
    assert mann_whitney_u([5.0] * 10, [5.0] * 10) == 1.0
    assert mann_whitney_u([], [1.0]) == 1.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=30),
    st.lists(st.integers(0, 50), min_size=1, max_size=30),
)
def test_mann_whitney_is_symmetric_and_a_probability(a: list[int], b: list[int]) -> None:
    x, y = [float(v) for v in a], [float(v) for v in b]
    p = mann_whitney_u(x, y)
    assert 0.0 <= p <= 1.0
    assert p == pytest.approx(mann_whitney_u(y, x))


def test_a_real_regression_fails_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(3)
    before = _log(tmp_path / "before.jsonl", {
        "retrieval": [rng.gauss(50, 5) for _ in range(60)],
        "generation": [rng.gauss(200, 20) for _ in range(60)],
    })
    after = _log(tmp_path / "after.jsonl", {
        "retrieval": [rng.gauss(80, 5) for _ in range(60)],  # 60% slower
        "generation": [rng.gauss(200, 20) for _ in range(60)],  # noise only
    })
    assert main(["compare", str(before), str(after), "--format", "json"]) == 0
    changes = {c["key"]: c for c in json.loads(capsys.readouterr().out)}
    assert changes["retrieval"]["verdict"] == "slower"
    assert changes["retrieval"]["p_value"] < 0.001
    assert changes["retrieval"]["p95_change_pct"] > 40
    assert changes["generation"]["verdict"] == "no significant change"
    assert changes["retrieval"]["count_before"] == 60

    assert main(["compare", str(before), str(after), "--fail-on-regression", "20"]) == 1
    out, err = capsys.readouterr()
    assert "retrieval p95 grew" in err
    assert "slower" in out
    assert "no significant change" in out
    # Above the threshold only: a 60% regression passes a 100% gate.
    assert main(["compare", str(before), str(after), "--fail-on-regression", "100"]) == 0
    capsys.readouterr()
    # The other way round it is faster, never a regression.
    assert main(["compare", str(after), str(before), "--fail-on-regression", "5"]) == 0
    assert "faster" in capsys.readouterr().out


def test_a_big_change_on_too_few_runs_is_not_significant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _log(tmp_path / "b.jsonl", {"retrieval": [10.0, 50.0, 30.0]})
    after = _log(tmp_path / "a.jsonl", {"retrieval": [12.0, 90.0, 28.0], "rerank": [1.0]})
    assert main(["compare", str(before), str(after), "--fail-on-regression", "10",
                 "--format", "json"]) == 0
    changes = {c["key"]: c for c in json.loads(capsys.readouterr().out)}
    assert changes["retrieval"]["p95_change_pct"] == pytest.approx(80.0)
    assert not changes["retrieval"]["significant"]
    assert changes["rerank"]["verdict"] == "new"


def test_a_stage_missing_from_the_candidate_fails_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _log(tmp_path / "b.jsonl", {"retrieval": [10.0] * 20, "rerank": [5.0] * 20})
    after = _log(tmp_path / "a.jsonl", {"retrieval": [10.0] * 20})  # rerank never ran
    assert main(["compare", str(before), str(after), "--fail-on-regression", "10"]) == 1
    out, err = capsys.readouterr()
    assert "gone" in out
    assert "rerank ran 20 times in the baseline and not in the candidate" in err
    assert "--allow-missing" in err
    # Opted out: a stage that was removed on purpose passes.
    assert main(["compare", str(before), str(after), "--fail-on-regression", "10",
                 "--allow-missing"]) == 0
    assert capsys.readouterr().err == ""
    # An empty candidate (a broken build that logged nothing) fails too.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["compare", str(before), str(empty), "--fail-on-regression", "10"]) == 1
    err = capsys.readouterr().err
    assert "retrieval ran 20 times" in err
    assert "rerank ran 20 times" in err
    # Without the gate, compare only reports.
    assert main(["compare", str(before), str(after)]) == 0


def test_sets_of_files_by_glob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for host in "ab":
        _log(tmp_path / f"before-{host}.jsonl", {"retrieval": [10.0] * 20})
        _log(tmp_path / f"after-{host}.jsonl", {"retrieval": [10.0] * 20})
    assert main(["compare", str(tmp_path / "before-*"), str(tmp_path / "after-*"),
                 "--format", "json"]) == 0
    (change,) = json.loads(capsys.readouterr().out)
    assert (change["count_before"], change["count_after"]) == (40, 40)
    assert change["verdict"] == "no significant change"


def test_help_names_the_test() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).with_name("rag-instrument")), "compare", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "Mann-Whitney U" in " ".join(out.split())
    # argparse does not %-format descriptions and epilogs: one percent sign, not two.
    assert "%%" not in out
    assert "in ms and %," in " ".join(out.split())
    assert "least p% of runs" in " ".join(out.split())


def test_empty_inputs_as_json_stay_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["compare", str(empty), str(empty), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == []
    assert "nothing to compare" in err
    assert main(["compare", str(empty), str(empty)]) == 0
    assert "nothing to compare" in capsys.readouterr().out


def test_a_p95_that_grew_from_zero_fails_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _log(tmp_path / "b.jsonl", {"reranking": [0.0] * 100})
    after = _log(tmp_path / "a.jsonl", {"reranking": [50.0] * 100})
    assert main(["compare", str(before), str(after), "--fail-on-regression", "10"]) == 1
    out, err = capsys.readouterr()
    assert "slower" in out
    assert "reranking p95 grew from 0" in err


def test_the_verdict_follows_the_runs_not_only_the_p95(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Most runs went from 10 to 50 ms; the slowest stayed at 100 ms: p95 unchanged, slower.
    before = _log(tmp_path / "b.jsonl", {"retrieval": [10.0] * 54 + [100.0] * 6})
    after = _log(tmp_path / "a.jsonl", {"retrieval": [50.0] * 54 + [100.0] * 6})
    assert main(["compare", str(before), str(after), "--format", "json"]) == 0
    (change,) = json.loads(capsys.readouterr().out)
    assert change["p95_change_ms"] == 0.0
    assert change["verdict"] == "slower"
    assert main(["compare", str(after), str(before), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["verdict"] == "faster"


def test_run_counts_are_exact_beyond_the_percentile_sample(tmp_path: Path) -> None:
    from rag_instrument.analysis import analyze
    from rag_instrument.analysis._compare import compare

    before = _log(tmp_path / "b.jsonl", {"retrieval": [float(i % 7) for i in range(120)]})
    after = _log(tmp_path / "a.jsonl", {"retrieval": [float(i % 7) for i in range(130)]})
    (change,) = compare(
        analyze([str(before)], max_values=50), analyze([str(after)], max_values=50)
    )
    assert (change.count_before, change.count_after) == (120, 130)


def test_a_growth_of_exactly_the_limit_passes_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _log(tmp_path / "b.jsonl", {"retrieval": [0.3] * 60})
    after = _log(tmp_path / "a.jsonl", {"retrieval": [0.33] * 60})  # +10.000000000000009%
    assert main(["compare", str(before), str(after), "--fail-on-regression", "10"]) == 0
    capsys.readouterr()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=40),
    st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=40),
)
def test_the_merged_rank_sum_equals_ranking_everything(a: list[float], b: list[float]) -> None:
    # Against a plain reference: rank the combined values (mean ranks for ties).
    from rag_instrument.analysis._stats import mann_whitney

    combined = sorted(a + b)
    rank = {}
    i = 0
    while i < len(combined):
        j = i
        while j + 1 < len(combined) and combined[j + 1] == combined[i]:
            j += 1
        rank[combined[i]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u1 = sum(rank[v] for v in a) - len(a) * (len(a) + 1) / 2.0
    mean = len(a) * len(b) / 2.0
    _p, direction = mann_whitney(a, b)
    assert direction == (0 if u1 == mean else (1 if u1 < mean else -1))


def test_the_test_ignores_nan_rather_than_stalling() -> None:
    from rag_instrument.analysis._stats import mann_whitney

    p_value, _direction = mann_whitney([1.0, float("nan"), 2.0], [3.0, 4.0])
    assert p_value == mann_whitney([1.0, 2.0], [3.0, 4.0])[0]


def test_stage_names_in_gate_messages_are_shown_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "evil\x1b[2Jstage"
    before = _log(tmp_path / "b.jsonl", {name: [10.0] * 60})
    after = _log(tmp_path / "a.jsonl", {name: [50.0] * 60})
    assert main(["compare", str(before), str(after), "--fail-on-regression", "10"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert "evil\\x1b[2Jstage p95 grew" in err
    gone = _log(tmp_path / "g.jsonl", {"other": [1.0]})
    assert main(["compare", str(before), str(gone), "--fail-on-regression", "10"]) == 1
    assert "\x1b" not in capsys.readouterr().err


def test_json_objects_name_their_stage_as_analyze_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _log(tmp_path / "b.jsonl", {"retrieval": [10.0] * 20})
    after = _log(tmp_path / "a.jsonl", {"retrieval": [11.0] * 20})
    assert main(["compare", str(before), str(after), "--format", "json"]) == 0
    (change,) = json.loads(capsys.readouterr().out)
    assert change["stage"] == change["key"] == "retrieval"


def test_the_table_heads_its_first_column_by_the_grouping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _log(tmp_path / "b.jsonl", {"retrieval": [10.0] * 20})
    after = _log(tmp_path / "a.jsonl", {"retrieval": [11.0] * 20})
    assert main(["compare", str(before), str(after), "--by", "event"]) == 0
    assert capsys.readouterr().out.split()[0] == "event"
    assert main(["compare", str(before), str(after)]) == 0
    assert capsys.readouterr().out.split()[0] == "stage"
