"""One self-contained HTML report: inline CSS and SVG, no script, nothing fetched."""

from __future__ import annotations

import time
from html import escape
from typing import Any

from rag_instrument import __version__
from rag_instrument.analysis import _svg
from rag_instrument.analysis._compare import Change
from rag_instrument.analysis._model import BREAKDOWN_KINDS, TOTAL_STAGE, Analysis
from rag_instrument.analysis._render import budget_text, empty_message, largest_text
from rag_instrument.analysis._stats import percentile

__all__ = ["SECTIONS", "render_report"]

#: Section ids, in page order (a section is left out when the input has nothing for it).
SECTIONS = (
    "summary",
    "comparison",
    "distributions",
    "share",
    "over-time",
    "slowest",
    "breakdown",
    "slow-queries",
    "n-plus-one",
    "retries",
    "cache",
    "budgets",
)
_TIME_SLOTS = 20

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{padding:.25rem .6rem;white-space:nowrap;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f4f4f4}tr.over td{color:#b00}tr.total td{font-weight:bold}
.note{color:#555;font-size:.9rem}svg{display:block;margin:.8rem 0;max-width:100%;height:auto}
code{background:#f4f4f4;padding:0 .2rem}.scroll{overflow-x:auto}
"""


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, cells in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _summary(analysis: Analysis) -> str:
    if not analysis.rows:
        return f'<p class="note">{escape(empty_message(analysis))}</p>'
    kinds = [k for k in BREAKDOWN_KINDS if any(k in r.breakdown_share for r in analysis.rows)]
    headers = [analysis.by, "runs", "errors", "avg ms", "p50 ms", "p95 ms", "p99 ms", "max ms",
               "budget", *(f"{k} %" for k in kinds), "cache hits"]
    rows, classes = [], []
    for r in analysis.rows:
        name = "\u00a0\u00a0" * r.depth + r.key + (" (whole request)" if r.is_total else "")
        rows.append(
            [name, str(r.count), str(r.errors), _ms(r.avg_ms), _ms(r.p50_ms), _ms(r.p95_ms),
             _ms(r.p99_ms), _ms(r.max_ms), budget_text(r),
             *(f"{100 * r.breakdown_share[k]:.0f}%" if k in r.breakdown_share else "-"
               for k in kinds),
             "-" if r.cache_hit_ratio is None else f"{100 * r.cache_hit_ratio:.0f}%"]
        )
        over = r.budget_ms is not None and r.p95_ms > r.budget_ms
        classes.append(" ".join(c for c in ("over" if over else "", "total" if r.is_total else "")
                                if c))
    return _table(headers, rows, classes) + (
        '<p class="note">Percentiles: nearest rank over every run (or a uniform sample of '
        "1,000,000 per stage beyond that). Rows over their budget at p95 are red.</p>"
    )


def _distributions(analysis: Analysis) -> str:
    charts = []
    for row in analysis.rows:
        values = analysis.samples.get(row.key, [])
        if values:
            charts.append(
                _svg.histogram(
                    f"{row.key}: latency distribution ({row.count} runs, p95 "
                    f"{row.p95_ms:.1f} ms)",
                    values,
                    row.budget_ms,
                )
            )
    return "".join(charts)


def _share(analysis: Analysis) -> str:
    total = next((r for r in analysis.rows if r.is_total), None)
    if total is None or not total.avg_ms:
        return ""
    children = [r for r in analysis.rows if r.parent == TOTAL_STAGE]
    if not children:
        return ""
    whole = total.avg_ms * total.count
    items = []
    for r in children:
        share = 100.0 * r.avg_ms * r.count / whole
        items.append((r.key, share, f"{share:.0f}% ({r.avg_ms:.1f} ms per run)"))
    rest = 100.0 - sum(v for _, v, _ in items)
    if rest > 0.5:
        items.append(("outside any stage", rest, f"{rest:.0f}%"))
    return _svg.bars(
        f"Each stage's share of the request's time ({TOTAL_STAGE}, mean {total.avg_ms:.1f} ms)",
        items,
        "% of the whole request's time",
    )


def _over_time(analysis: Analysis) -> str:
    points = {k: v for k, v in analysis.series.items() if v}
    if not points:
        return ""
    start = min(p[0][0] for p in points.values())
    end = max(p[-1][0] for p in points.values())
    span = max(end - start, 1e-6)
    series = []
    for row in analysis.rows:
        pts = points.get(row.key)
        if not pts:
            continue
        slots: list[list[float]] = [[] for _ in range(_TIME_SLOTS)]
        for t, ms in pts:
            slots[min(_TIME_SLOTS - 1, int((t - start) / span * _TIME_SLOTS))].append(ms)
        series.append(
            (row.key, [(i, percentile(sorted(s), 95)) for i, s in enumerate(slots) if s])
        )
    origin = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start))
    if span < 120:  # seconds since the first line
        labels = [f"{span * i / (_TIME_SLOTS - 1):.3g} s" for i in range(_TIME_SLOTS)]
        x_label = f"time since {origin} UTC"
    else:
        fmt = "%H:%M" if span < 2 * 86400 else "%m-%d %H:%M"
        labels = [
            time.strftime(fmt, time.gmtime(start + span * i / (_TIME_SLOTS - 1)))
            for i in range(_TIME_SLOTS)
        ]
        x_label = "time (UTC)"
    return _svg.lines(
        f"p95 per stage over time ({_TIME_SLOTS} slots of {span / _TIME_SLOTS:.3g} s)",
        series,
        x_label,
        "p95 (ms)",
        labels,
        _TIME_SLOTS,
    )


def _slowest(analysis: Analysis) -> str:
    return "".join(
        _svg.waterfall(
            f"trace {w.trace_id}: {w.total_ms:.1f} ms", w.stages, w.total_ms
        )
        for w in analysis.waterfalls
    )


def _breakdown(analysis: Analysis) -> str:
    rows = []
    for r in analysis.rows:
        if not r.breakdown_ms:
            continue
        segments = [(k, v) for k, v in r.breakdown_ms.items() if v > 0]
        rest = r.avg_ms - sum(v for _, v in segments)
        if rest > 0.05:
            segments.append(("other", rest))
        rows.append((r.key, segments))
    if not rows:
        return ""
    return _svg.stacked_bars(
        "Where the time went inside each stage (mean ms per run)", rows, "ms per run"
    )


def _side(analysis: Analysis) -> dict[str, str]:
    out: dict[str, str] = {}
    if analysis.slow_queries:
        out["slow-queries"] = _table(
            ["statement", "count", "total ms", "worst ms", "stages"],
            [[e["statement"], str(e["count"]), _ms(e["total_ms"]), _ms(e["worst_ms"]),
              ", ".join(e["stages"])] for e in analysis.slow_queries],
        )
    if analysis.n_plus_one:
        out["n-plus-one"] = _table(
            ["relationship", "warnings", "max statements", "stages"],
            [[e["relationship"], str(e["warnings"]), str(e["max_count"]), ", ".join(e["stages"])]
             for e in analysis.n_plus_one],
        )
    if analysis.retries:
        out["retries"] = _table(
            ["target", "error type", "retries"],
            [[e["target"], e["error_type"], str(e["retries"])] for e in analysis.retries],
        )
    if analysis.cache:
        out["cache"] = _table(
            ["namespace", "hits", "lookups", "hit ratio"],
            [[e["namespace"], str(e["hits"]), str(e["lookups"]),
              "-" if e["hit_ratio"] is None else f"{100 * e['hit_ratio']:.0f}%"]
             for e in analysis.cache],
        )
    if analysis.budget_exceeded:
        out["budgets"] = _table(
            ["stage", "times", "largest part each time"],
            [[e["stage"], str(e["times"]), largest_text(e["largest"])]
             for e in analysis.budget_exceeded],
        )
    return out


def _comparison(changes: list[Change]) -> str:
    rows = []
    for c in changes:
        change = "-" if c.p95_change_ms is None else f"{c.p95_change_ms:+.1f} ms"
        if c.p95_change_pct is not None:
            change += f" ({c.p95_change_pct:+.0f}%)"
        # The compare command's table: p50, p95 and p99 before and after, stages nested.
        rows.append(["\u00a0\u00a0" * c.depth + c.key, f"{c.count_before} → {c.count_after}",
                     f"{_ms(c.p50_before)} → {_ms(c.p50_after)}",
                     f"{_ms(c.p95_before)} → {_ms(c.p95_after)}",
                     f"{_ms(c.p99_before)} → {_ms(c.p99_after)}", change,
                     "-" if c.p_value is None else f"{c.p_value:.3g}", c.verdict])
    items: list[tuple[str, float, str]] = []
    for c in changes:
        if c.p95_before is not None and c.p95_after is not None:
            items += [(f"{c.key} before", c.p95_before, f"{c.p95_before:.1f} ms"),
                      (f"{c.key} after", c.p95_after, f"{c.p95_after:.1f} ms")]
    colours = [_svg.PALETTE[7], _svg.PALETTE[0]] * (len(items) // 2)
    chart = (
        _svg.bars("p95 per stage: baseline (grey), candidate (blue)", items, "p95 (ms)",
                  colours=colours)
        if items
        else ""
    )
    headers = ["stage", "runs", "p50 ms", "p95 ms", "p99 ms", "p95 change", "p-value", "verdict"]
    return _table(headers, rows) + (
        '<p class="note">Beyond noise: two-sided Mann-Whitney U test, p &lt; 0.05.</p>' + chart
    )


_TITLES = {
    "summary": "Stages",
    "comparison": "Compared with the baseline",
    "distributions": "Latency distributions, with budgets",
    "share": "Share of the request's time",
    "over-time": "p95 over time",
    "slowest": "The slowest requests",
    "breakdown": "Where the time went inside each stage",
    "slow-queries": "Slow queries, by statement shape",
    "n-plus-one": "N+1 warnings, by relationship",
    "retries": "Retries, by target and error type",
    "cache": "Cache, by namespace",
    "budgets": "Budgets exceeded, and what was largest each time",
}


def render_report(
    analysis: Analysis, sources: list[str], changes: list[Change] | None = None
) -> str:
    """The whole page."""
    body: dict[str, str] = {"summary": _summary(analysis)}
    if changes is not None:
        body["comparison"] = _comparison(changes)
    body["distributions"] = _distributions(analysis)
    body["share"] = _share(analysis)
    body["over-time"] = _over_time(analysis)
    body["slowest"] = _slowest(analysis)
    body["breakdown"] = _breakdown(analysis)
    body.update(_side(analysis))
    sections = [
        f'<section id="{key}"><h2>{escape(_TITLES[key])}</h2>{body[key]}</section>'
        for key in SECTIONS
        if body.get(key)
    ]
    meta: dict[str, Any] = {
        "inputs": ", ".join(sources),
        "lines": analysis.inputs.lines,
        "unusable": analysis.inputs.bad_lines,
    }
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>rag_instrument report: {escape(meta['inputs'])}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Where the time went</h1><p class=\"note\">{escape(str(meta['inputs']))}: "
        f"{meta['lines']} lines ({meta['unusable']} unusable); generated by rag-instrument "
        f"{escape(__version__)}.</p>" + "".join(sections) + "</body></html>\n"
    )
