"""``rag-instrument compare BASELINE CANDIDATE``: did a change make a stage slower?"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from rag_instrument.analysis._compare import ALPHA, Change, compare
from rag_instrument.analysis._render import printable, use_colour
from rag_instrument.cli.analyze import PERCENTILES_HELP, add_input_options, budgets_of, load

__all__ = ["add_parser", "render_changes", "run"]

TEST_HELP = (
    "Beyond noise means a two-sided Mann-Whitney U test (rank-sum; normal approximation with "
    "tie and continuity corrections, the normal tail from Python's math.erfc) gives "
    f"p < {ALPHA} (--alpha) between the baseline's and the candidate's durations of that group."
)


def _f(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def render_changes(changes: list[Change], colour: bool = False, by: str = "stage") -> str:
    """An aligned table of the changes; ``by`` heads the first column (stage, route, event)."""
    headers = [by, "runs", "p50 ms", "p95 ms", "p99 ms", "p95 change", "p-value", "verdict"]
    rows = []
    for c in changes:
        change = "-"
        if c.p95_change_ms is not None:
            change = f"{_f(c.p95_change_ms, True)} ms"
            if c.p95_change_pct is not None:
                change += f" ({c.p95_change_pct:+.0f}%)"
        rows.append(
            [
                "  " * c.depth + printable(c.key),
                f"{c.count_before} -> {c.count_after}",
                f"{_f(c.p50_before)} -> {_f(c.p50_after)}",
                f"{_f(c.p95_before)} -> {_f(c.p95_after)}",
                f"{_f(c.p99_before)} -> {_f(c.p99_after)}",
                change,
                "-" if c.p_value is None else f"{c.p_value:.3g}",
                c.verdict,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i in (0, 7) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    for item, cells in zip(changes, rows, strict=True):
        text = line(cells)
        if colour and item.verdict == "slower":
            text = f"\x1b[31m{text}\x1b[0m"
        elif colour and item.verdict == "faster":
            text = f"\x1b[32m{text}\x1b[0m"
        out.append(text)
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rag-instrument compare``."""
    try:
        budgets = budgets_of(args)
    except ValueError as exc:
        print(f"rag-instrument: {exc}", file=sys.stderr)
        return 2
    before = load(args, [args.baseline], budgets)
    after = load(args, [args.candidate], budgets)
    if before is None or after is None:
        return 2
    changes = compare(before, after, alpha=args.alpha)
    if not changes:
        message = "No stage runs in either input: nothing to compare."
        if args.format == "json":  # the output stays machine-readable: the word goes aside
            sys.stdout.write("[]\n")
            print(f"rag-instrument: {message}", file=sys.stderr)
        else:
            print(message)
        return 0
    # Each row names its group as analyze does ("stage", "event", "route"); JSON beside "key".
    by = getattr(args, "by", "stage") or "stage"
    if args.format == "json":
        rows = [{by: c.key, **c.as_json()} for c in changes]
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_changes(changes, colour=use_colour(sys.stdout), by=by))
    if args.fail_on_regression is not None:
        regressed = [c for c in changes if c.p95_regressed_beyond(args.fail_on_regression)]
        for c in regressed:
            grew = "from 0" if c.p95_change_pct is None else f"{c.p95_change_pct:.0f}%"
            # The gate reads p95 alone; the verdict, the runs as a whole (which may be faster).
            overall = "" if c.verdict == "slower" else f"; the runs as a whole: {c.verdict}"
            print(
                f"rag-instrument: {printable(c.key)} p95 grew {grew} "
                f"({_f(c.p95_before)} -> {_f(c.p95_after)} ms, p={c.p_value:.3g}{overall})",
                file=sys.stderr,
            )
        gone = [] if args.allow_missing else [c for c in changes if c.verdict == "gone"]
        for c in gone:
            print(
                f"rag-instrument: {printable(c.key)} ran {c.count_before} times in the baseline "
                "and not "
                "in the candidate (pass --allow-missing if it was removed on purpose)",
                file=sys.stderr,
            )
        if regressed or gone:
            return 1
    return 0


def _pct(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a percentage >= 0, got {text!r}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a significance level in (0, 1), got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register ``compare``."""
    parser = subparsers.add_parser(
        "compare",
        help="p50/p95/p99 per stage before and after, and whether the change is beyond noise",
        description="Per stage: p50/p95/p99 of the baseline and the candidate, the p95 change "
        "in ms and %, and whether the difference is beyond noise.",
        epilog=TEST_HELP + " " + PERCENTILES_HELP,
    )
    parser.add_argument("baseline", metavar="BASELINE", help="log(s) before: a file or a glob")
    parser.add_argument("candidate", metavar="CANDIDATE", help="log(s) after: a file or a glob")
    add_input_options(parser, files=False)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--alpha", type=_alpha, default=ALPHA, help=f"default {ALPHA}")
    parser.add_argument(
        "--fail-on-regression", type=_pct, metavar="PCT",
        help="exit 1 when a stage's p95 grew by more than PCT percent and the change is "
        "significant, or when a stage of the baseline has no runs in the candidate "
        "(a CI gate for performance regressions)",
    )
    parser.add_argument(
        "--allow-missing", action="store_true",
        help="with --fail-on-regression: let stages of the baseline that have no runs in "
        "the candidate pass (removed on purpose)",
    )
    parser.set_defaults(func=run)
