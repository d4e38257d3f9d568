"""Rendering an analysis: an aligned table (colour on terminals only), JSON, CSV."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any, Final, TextIO

import orjson

from rag_instrument.analysis._model import BREAKDOWN_KINDS, Analysis, Row

__all__ = [
    "budget_text",
    "empty_message",
    "largest_text",
    "printable",
    "render_csv",
    "render_json",
    "render_table",
    "use_colour",
]

_RED, _BOLD, _DIM, _RESET = "\x1b[31m", "\x1b[1m", "\x1b[2m", "\x1b[0m"


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):
        return False


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10_000 else f"{value:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def budget_text(row: Row) -> str:
    """``"3 of 50 over 90 ms"``, or ``"-"`` without a budget."""
    if row.budget_ms is None:
        return "-"
    budget = f"{row.budget_ms:g} ms"
    if row.over_budget is None:
        return f"budget {budget}"
    return f"{row.over_budget} of {row.count} over {budget}"


def _label(row: Row, by: str) -> str:
    name = "  " * row.depth + row.key
    if row.is_total:
        name += " (whole request)"
    return name if by == "stage" else row.key


# Control characters from a log's text (a stage name, a statement) are shown escaped: an
# escape sequence written to the terminal would recolour, move or hide the table.
_CONTROLS: Final = {
    code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))
}


def printable(text: str) -> str:
    """``text`` with its control characters escaped (as backslash-x codes), for a terminal."""
    return text.translate(_CONTROLS)


def _grid(headers: Sequence[str], rows: list[list[str]], left: int = 1) -> list[str]:
    rows = [[cell.translate(_CONTROLS) for cell in cells] for cells in rows]
    widths = [len(h) for h in headers]
    for cells in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(c) for c in rows)]


def render_table(analysis: Analysis, colour: bool = False) -> str:
    """The table and, below it, the side tables the log has data for."""
    by = analysis.by
    kinds = [k for k in BREAKDOWN_KINDS if any(k in r.breakdown_share for r in analysis.rows)]
    has_cache = any(r.cache_hit_ratio is not None for r in analysis.rows)
    # CPU beside the average (resource_metrics): "computing or waiting?" in one glance.
    has_cpu = any(r.avg_cpu_ms is not None for r in analysis.rows)
    headers = [by, "runs", "errors", "avg ms", *(["cpu ms"] if has_cpu else [])]
    headers += ["p50 ms", "p95 ms", "p99 ms", "max ms", "budget"]
    headers += [f"{k} %" for k in kinds] + (["cache hits"] if has_cache else [])
    cells: list[list[str]] = []
    over_p95: list[bool] = []
    for row in analysis.rows:
        cells.append(
            [
                _label(row, by),
                str(row.count),
                str(row.errors),
                _ms(row.avg_ms),
                *([_ms(row.avg_cpu_ms)] if has_cpu else []),
                # "~": over a uniform sample of the group's runs (see the note below).
                _ms(row.p50_ms) + ("" if row.exact else "~"),
                _ms(row.p95_ms) + ("" if row.exact else "~"),
                _ms(row.p99_ms) + ("" if row.exact else "~"),
                _ms(row.max_ms),
                budget_text(row),
                *(_pct(row.breakdown_share.get(k)) for k in kinds),
                *([_pct(row.cache_hit_ratio)] if has_cache else []),
            ]
        )
        over_p95.append(row.budget_ms is not None and row.p95_ms > row.budget_ms)
    lines = _grid(headers, cells)
    if colour:
        lines[0] = _BOLD + lines[0] + _RESET
        for i, over in enumerate(over_p95):
            if over:
                lines[i + 2] = _RED + lines[i + 2] + _RESET
    out = lines
    if any(not r.exact for r in analysis.rows):
        out.append(
            "(~: percentiles over a uniform sample of that group's runs, which were more than "
            "kept; counts, means and maxima are exact)"
        )
    for title, table in _side_tables(analysis):
        out += ["", (_BOLD + title + _RESET) if colour else title, *table]
    return "\n".join(out) + "\n"


def _side_tables(analysis: Analysis) -> list[tuple[str, list[str]]]:
    tables: list[tuple[str, list[str]]] = []
    if analysis.slow_queries:
        tables.append(
            (
                "Slow queries, by statement shape",
                _grid(
                    ["statement", "count", "total ms", "worst ms", "stages"],
                    [
                        [
                            _short(e["statement"]),
                            str(e["count"]),
                            _ms(e["total_ms"]),
                            _ms(e["worst_ms"]),
                            ",".join(e["stages"]) or "-",
                        ]
                        for e in analysis.slow_queries
                    ],
                ),
            )
        )
    if analysis.n_plus_one:
        tables.append(
            (
                "N+1 warnings, by relationship",
                _grid(
                    ["relationship", "warnings", "max statements", "stages"],
                    [
                        [_short(e["relationship"]), str(e["warnings"]), str(e["max_count"]),
                         ",".join(e["stages"]) or "-"]
                        for e in analysis.n_plus_one
                    ],
                ),
            )
        )
    if analysis.retries:
        tables.append(
            (
                "Retries, by target and error type",
                _grid(
                    ["target", "error type", "retries"],
                    [[e["target"], e["error_type"], str(e["retries"])] for e in analysis.retries],
                ),
            )
        )
    if analysis.cache:
        tables.append(
            (
                "Cache, by namespace",
                _grid(
                    ["namespace", "hits", "lookups", "hit ratio"],
                    [
                        [e["namespace"], str(e["hits"]), str(e["lookups"]), _pct(e["hit_ratio"])]
                        for e in analysis.cache
                    ],
                ),
            )
        )
    if analysis.budget_exceeded:
        tables.append(
            (
                "Budget exceeded, and what was largest each time",
                _grid(
                    [analysis.by, "times", "largest"],  # a stage, or a route's requests
                    [
                        [
                            e["stage"],
                            str(e["times"]),
                            largest_text(e["largest"]),
                        ]
                        for e in analysis.budget_exceeded
                    ],
                ),
            )
        )
    return tables


def largest_text(largest: dict[str, int]) -> str:
    """``"llm 2, db 1"``: how often each part was the largest; ``"-"`` (no breakdown) in words."""
    return ", ".join(
        f"{n} with no breakdown" if kind == "-" else f"{kind} {n}" for kind, n in largest.items()
    )


def _short(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_json(analysis: Analysis) -> str:
    """A JSON list with one object per row (see :meth:`Row.as_json`)."""
    rows = [row.as_json(analysis.by) for row in analysis.rows]
    return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n"


def render_csv(analysis: Analysis) -> str:
    """One CSV row per group; breakdown shares as ``<kind>_share`` columns."""
    kinds = sorted({k for r in analysis.rows for k in r.breakdown_share})
    has_cpu = any(r.avg_cpu_ms is not None for r in analysis.rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [
        analysis.by, "count", "errors", "cancelled", "avg_ms",
        *(["avg_cpu_ms"] if has_cpu else []), "p50_ms", "p95_ms", "p99_ms",
        "max_ms", "budget_ms", "over_budget", *(f"{k}_share" for k in kinds),
        "cache_hit_ratio", "parent", "depth",
    ]
    writer.writerow(columns)
    for row in analysis.rows:
        values: list[Any] = [
            row.key, row.count, row.errors, row.cancelled, _num(row.avg_ms),
            *([_num(row.avg_cpu_ms)] if has_cpu else []), _num(row.p50_ms),
            _num(row.p95_ms), _num(row.p99_ms), _num(row.max_ms), _num(row.budget_ms),
            "" if row.over_budget is None else row.over_budget,
            *(_num(row.breakdown_share.get(k)) for k in kinds),
            _num(row.cache_hit_ratio), row.parent or "", row.depth,
        ]
        writer.writerow(values)
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(round(value, 6))


def empty_message(analysis: Analysis) -> str:
    """What to say when there is nothing to show."""
    what = {"stage": "stage runs", "event": "timed lines", "route": "'request completed' lines"}
    lines = analysis.inputs.lines
    return (
        f"No {what[analysis.by]} found ({lines} line(s) read from "
        f"{analysis.inputs.files} input(s)): the input is empty."
        if lines == 0
        else f"No {what[analysis.by]} found in {lines} line(s) from "
        f"{analysis.inputs.files} input(s)."
    )
