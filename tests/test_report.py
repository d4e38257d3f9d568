"""``rag-instrument report``: one self-contained HTML page, checked as HTML and in a browser."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rag_instrument.cli.__main__ import main
from rag_instrument.cli.demo import run_demo
from support.browser import chromium, render


class Page(HTMLParser):
    """Sections, SVGs with their titles and texts, and every URL the page refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.svgs: list[dict[str, object]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(values.get("id") or "")
        if tag == "svg":
            self.svgs.append({"title": "", "texts": [], "section": self.sections[-1],
                              "rects": 0, "lines": 0})
        if self.svgs and tag == "rect":
            self.svgs[-1]["rects"] += 1  # type: ignore[operator]
        if self.svgs and tag == "line":
            self.svgs[-1]["lines"] += 1  # type: ignore[operator]
        for name in ("src", "href"):
            if values.get(name):
                self.urls.append(values[name] or "")
        self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if not self.svgs or "svg" not in self._stack:
            return
        svg = self.svgs[-1]
        if self._stack[-1] == "title" and not svg["title"]:
            svg["title"] = data
        elif self._stack[-1] == "text":
            svg["texts"].append(data)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def demo_logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("report")
    before, after = tmp / "before.jsonl", tmp / "after.jsonl"
    run_demo(before, requests=16, fault_rate=0.3)
    run_demo(after, requests=16, fault_rate=0.3)
    return before, after


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def test_the_report_has_every_chart_with_titles_axes_and_units(
    demo_logs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, after = demo_logs
    out = tmp_path / "report.html"
    assert main(["report", str(after), "-o", str(out), "--baseline", str(before)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    page = _parse(out)
    assert page.sections == [
        "summary", "comparison", "distributions", "share", "over-time", "slowest",
        "breakdown", "slow-queries", "n-plus-one", "retries", "cache", "budgets",
    ]
    # Self-contained: no script, no external stylesheet, image or link; nothing to fetch.
    assert "script" not in page.tags
    assert page.urls == []
    by_section: dict[str, list[dict[str, object]]] = {}
    for svg in page.svgs:
        assert svg["title"], svg
        by_section.setdefault(str(svg["section"]), []).append(svg)
    distributions = by_section["distributions"]
    assert len(distributions) == 7  # search, rewrite, retrieval, embedding, rerank, generation, ingestion
    retrieval = next(s for s in distributions if str(s["title"]).startswith("retrieval:"))
    texts = " ".join(retrieval["texts"])  # type: ignore[arg-type]
    assert "duration (ms)" in texts
    assert "runs" in texts
    assert "budget 60 ms:" in texts  # the budget drawn on the distribution
    (share,) = by_section["share"]
    assert "% of the whole request's time" in " ".join(share["texts"])  # type: ignore[arg-type]
    (over_time,) = by_section["over-time"]
    over_texts = set(over_time["texts"])  # type: ignore[call-overload]
    assert {"p95 (ms)", "retrieval", "generation", "0 s"} <= over_texts
    assert any(t.startswith("time since ") and t.endswith(" UTC") for t in over_texts)
    waterfalls = by_section["slowest"]
    assert 1 <= len(waterfalls) <= 8
    assert all(str(w["title"]).startswith("trace ") for w in waterfalls)
    first = " ".join(waterfalls[0]["texts"])  # type: ignore[arg-type]
    assert "time since the request started (ms)" in first
    texts = waterfalls[0]["texts"][1:]  # type: ignore[index]  # after the title
    names = [t for t in texts if not t[0].isdigit() and not t.startswith("time since")]
    # In tree order: the request, then its stages, embedding right under retrieval.
    assert names[0] == "search"
    assert names.index("└ embedding") == names.index("└ retrieval") + 1
    assert {"└ query_rewriting", "└ reranking", "└ generation"} <= set(names)
    (breakdown,) = by_section["breakdown"]
    assert {"db", "llm", "vector", "embedding"} <= set(breakdown["texts"])  # type: ignore[arg-type]
    html = out.read_text()
    assert "Document.chunks" in html  # the N+1 table
    assert "WITH RECURSIVE" in html  # the slow-query table
    assert "TransientError" in html  # the retry table
    assert "Mann-Whitney" in html  # the comparison


def test_a_log_without_side_data_leaves_those_sections_out(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text(json.dumps({
        "timestamp": "2026-11-25T15:33:19.000000Z", "level": "info", "event": "x completed",
        "logger": "rag_instrument", "context": {"pipeline_stage": "x"}, "execution_time_ms": 3.0,
    }) + "\n")
    out = tmp_path / "r.html"
    assert main(["report", str(log), "-o", str(out)]) == 0
    assert _parse(out).sections == ["summary", "distributions", "over-time"]


def _need_chromium() -> None:
    if chromium() is None:
        pytest.fail("chromium is not installed (.ci/services.sh installs it)")


def test_the_report_renders_in_a_browser_without_errors(
    demo_logs: tuple[Path, Path], tmp_path: Path
) -> None:
    _need_chromium()
    before, after = demo_logs
    out = tmp_path / "report.html"
    assert main(["report", str(after), "-o", str(out), "--baseline", str(before)]) == 0
    shot = render(out, width=900, height=1200)
    assert shot.console == []
    assert (shot.width, shot.height) == (900, 1200)
    colours: dict[tuple[int, int, int], int] = {}
    for row in shot.pixels[::4]:
        for pixel in row[::4]:
            colours[pixel] = colours.get(pixel, 0) + 1
    sampled = sum(colours.values())
    background = max(colours.values())
    # Not blank: text, table rules and coloured bars cover a good part of the page.
    assert len(colours) > 50
    assert background / sampled < 0.97
    # The red of over-budget rows and the blue of the bars are on screen.
    assert any(r > 150 and g < 60 and b < 60 for (r, g, b) in colours)
    assert any(b > 150 and r < 60 for (r, g, b) in colours)


def test_the_browser_check_sees_console_errors(tmp_path: Path) -> None:
    _need_chromium()
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><p>x</p><script>no_such_function()</script>")
    shot = render(broken, width=300, height=200)
    assert any("no_such_function is not defined" in line for line in shot.console)


def test_an_empty_input_says_so_on_stderr_and_on_the_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "empty.jsonl"
    log.write_text("")
    out = tmp_path / "r.html"
    assert main(["report", str(log), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "No stage runs found" in err
    assert "the input is empty" in err
    assert "No stage runs found" in out.read_text()


def test_the_baseline_comparison_is_the_compare_table(
    demo_logs: tuple[Path, Path], tmp_path: Path
) -> None:
    # As `rag-instrument compare` prints it: p50, p95 and p99 before and after, nested.
    before, after = demo_logs
    out = tmp_path / "report.html"
    assert main(["report", str(after), "-o", str(out), "--baseline", str(before)]) == 0
    html = out.read_text()
    section = html[html.index('<section id="comparison">') :]
    section = section[: section.index("</section>")]
    for header in ("stage", "runs", "p50 ms", "p95 ms", "p99 ms", "p95 change", "p-value"):
        assert f"<th>{header}</th>" in section, header
    assert "\u00a0\u00a0retrieval" in section  # nested under the whole request, as in compare


def test_a_log_holding_the_same_runs_twice_is_reported(tmp_path: Path) -> None:
    # `cat app.log app.log > x`: equal runs, and report looped for ever (a run was taken as
    # its own child). Run in a child process so that a regression fails instead of hanging.
    import subprocess
    import sys

    lines = [
        {"timestamp": "2026-12-04T21:00:00.050000Z", "level": "info",
         "event": "retrieval completed", "trace_id": "0c" * 16, "span_id": "a2" * 8,
         "context": {"pipeline_stage": "retrieval"}, "execution_time_ms": 40.0},
        {"timestamp": "2026-12-04T21:00:00.100000Z", "level": "info",
         "event": "search completed", "trace_id": "0c" * 16, "span_id": "a1" * 8,
         "context": {"pipeline_stage": "search"}, "execution_time_ms": 100.0},
    ]
    log = tmp_path / "twice.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines * 2))
    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "rag_instrument.cli", "report", str(log), "-o", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "retrieval" in out.read_text()


@pytest.mark.parametrize("values", [[1e-9], [5e-324], [1e-9, 0.0], [1e308, 1e308]])
def test_extreme_durations_are_reported_not_a_traceback(
    tmp_path: Path, values: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    # Valid JSON numbers: the over-time chart divided by zero, the ticks' logarithm
    # failed, and the exact sum overflowed (1e308 + 1e308).
    log = tmp_path / "extreme.jsonl"
    log.write_text(
        "".join(
            json.dumps({
                "timestamp": f"2026-12-04T21:00:0{i}.000000Z",
                "context": {"pipeline_stage": "search"},
                "execution_time_ms": value,
                "breakdown": {"db": {"count": 1, "ms": value}},
            }) + "\n"
            for i, value in enumerate(values)
        )
    )
    assert main(["report", str(log), "-o", str(tmp_path / "r.html")]) == 0
    assert main(["analyze", str(log), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert row["count"] == len(values)


@pytest.mark.parametrize("flag", ["input", "baseline", "glob"])
def test_the_report_never_replaces_a_log_it_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    log = tmp_path / "a.jsonl"
    other = tmp_path / "b.jsonl"
    for path in (log, other):
        path.write_text(json.dumps({"context": {"pipeline_stage": "x"}, "execution_time_ms": 3.0}))
    before = log.read_bytes()
    args = ["report", str(log), "-o", str(log)]
    if flag == "glob":  # the page written over a log the pattern takes in
        args = ["report", f"{tmp_path}/*.jsonl", "-o", str(log)]
    if flag == "baseline":  # the page written over the baseline, by another spelling of it
        args = ["report", str(other), "--baseline", str(log), "-o", f"{tmp_path}/./a.jsonl"]
    assert main(args) == 2
    assert "the report would replace the log it reads" in capsys.readouterr().err
    assert log.read_bytes() == before


def test_the_demo_refuses_a_report_over_its_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "x.jsonl"
    assert main(["demo", "--log-file", str(log), "--report", str(log), "--requests", "2"]) == 2
    assert "is the log file" in capsys.readouterr().err
    assert not log.exists()
