"""``rag-instrument report FILE... -o report.html [--baseline OLD]``: one HTML file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rag_instrument.analysis import expand
from rag_instrument.analysis._compare import compare
from rag_instrument.analysis._render import empty_message
from rag_instrument.analysis._report import render_report
from rag_instrument.cli.analyze import PERCENTILES_HELP, add_input_options, budgets_of, load

__all__ = ["add_parser", "overwrites_input", "run", "write_report"]


def write_report(
    args: argparse.Namespace, files: list[str], output: Path, baseline: str | None = None
) -> int:
    """Analyse ``files`` (and ``baseline``) and write the page; return the exit status."""
    overwritten = overwrites_input(output, [*files, *([baseline] if baseline else [])])
    if overwritten is not None:
        print(
            f"rag-instrument: -o {output} is an input ({overwritten}): the report would "
            "replace the log it reads; write it elsewhere",
            file=sys.stderr,
        )
        return 2
    try:
        budgets = budgets_of(args)
    except ValueError as exc:
        print(f"rag-instrument: {exc}", file=sys.stderr)
        return 2
    analysis = load(args, files, budgets, details=True)
    if analysis is None:
        return 2
    changes = None
    if baseline is not None:
        before = load(args, [baseline], budgets)
        if before is None:
            return 2
        changes = compare(before, analysis)
    if not analysis.rows:  # said, as analyze says it; the page says it too
        print(f"rag-instrument: {empty_message(analysis)}", file=sys.stderr)
    page = render_report(analysis, files, changes)
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        print(f"rag-instrument: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def overwrites_input(output: Path, inputs: list[str]) -> str | None:
    """The input ``output`` is the same file as, if any (globs expanded as they are read)."""
    sources, _missing = expand(inputs)
    for name in (source.name for source in sources):
        if name == "-":
            continue
        try:
            if Path(name).exists() and output.exists() and output.samefile(name):
                return name
            if Path(name).resolve() == output.resolve():
                return name
        except OSError:
            continue
    return None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rag-instrument report``."""
    status = write_report(args, args.files, Path(args.output), args.baseline)
    if status == 0:
        print(f"Report: {Path(args.output).resolve()}")
    return status


def add_parser(subparsers: Any) -> None:
    """Register ``report``."""
    parser = subparsers.add_parser(
        "report",
        help="one self-contained HTML page with charts (opens from disk, no network)",
        description="Per-stage latency distributions with budgets, each stage's share of the "
        "request, p95 over time, the slowest requests as waterfalls, breakdown bars, and the "
        "slow-query, N+1, retry, cache and budget tables; with --baseline, the comparison.",
        epilog=PERCENTILES_HELP,
    )
    add_input_options(parser)
    parser.add_argument("-o", "--output", default="report.html", help="default report.html")
    parser.add_argument("--baseline", metavar="OLD", help="compare with this log (or glob)")
    parser.set_defaults(func=run)
