"""``rag-instrument analyze``: per-stage latency from JSON logs or OTLP JSON span files.

Also the input options and loading that ``compare`` and ``report`` share.
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from typing import Any

from rag_instrument._utils import route_key
from rag_instrument.analysis import DEFAULT_MAX_VALUES, Aggregator, Analysis, expand, parse_time
from rag_instrument.analysis._parallel import default_jobs
from rag_instrument.analysis._render import (
    empty_message,
    printable,
    render_csv,
    render_json,
    render_table,
    use_colour,
)

__all__ = ["add_input_options", "add_parser", "load", "parse_budgets", "run"]

PERCENTILES_HELP = (
    "Percentiles are exact, by the nearest-rank method (the smallest recorded duration with at "
    f"least p% of runs at or below it), over up to {DEFAULT_MAX_VALUES:,} runs per group; "
    "beyond that over a uniform reservoir sample of that many runs (rank error about 0.02 "
    "percentage points at p95). Counts, means, maxima and budget violations are always "
    "exact. Memory: a few MB of read buffers plus about 40 bytes per kept run (8 while "
    "reading, the sorted values at the end), for each input compare reads."
)

EPILOG = (
    "Inputs: JSON-lines logs written by rag_instrument (a stage run is a line with "
    "context.pipeline_stage and execution_time_ms), or OTLP JSON lines written by the "
    "OpenTelemetry Collector's file exporter (stage spans carry rag.stage). Files, globs "
    "(quote them), '-' for stdin; gzip is detected by content. Unusable lines are counted "
    "and the first one per file is named on stderr; exit 2 only when nothing could be read. "
    + PERCENTILES_HELP
)


def _budget(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not sep or not name.strip() or not (ms > 0 and math.isfinite(ms)):
        raise argparse.ArgumentTypeError(
            f"--budget expects STAGE=MS with MS a positive number, got {text!r}"
        )
    return name.strip(), ms


def at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1 (``--jobs``, the demo's ``--requests``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-11-25T15:30:00Z, got {text!r}"
        ) from None


def parse_budgets(path: str) -> dict[str, float]:
    """Budgets from a TOML file: ``stage = ms`` pairs, top-level or under ``[budgets]``.

    Raises:
        ValueError: the file cannot be read, is not TOML, or a value is not a positive number.
    """
    try:
        with open(path, "rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"--budgets {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--budgets {path}: not valid TOML ({exc})") from None
    section = data.get("budgets", {})
    if not isinstance(section, dict):
        raise ValueError(f"--budgets {path}: [budgets] must be a table of stage = ms")  # noqa: TRY004
    # Top-level pairs and the [budgets] table together (the table wins); other tables
    # (a pyproject's [tool...]) are not budgets.
    table = {k: v for k, v in data.items() if k != "budgets" and not isinstance(v, dict)}
    table.update(section)
    budgets: dict[str, float] = {}
    for name, value in table.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not value > 0
            or not math.isfinite(value)
        ):
            raise ValueError(
                f"--budgets {path}: budget for {name!r} must be a positive number of "
                f"milliseconds, got {value!r}"
            )
        budgets[name] = float(value)
    return budgets


def add_input_options(parser: argparse.ArgumentParser, *, files: bool = True) -> None:
    """The options every analysis command takes."""
    if files:
        parser.add_argument(
            "files", nargs="+", metavar="FILE", help="log or OTLP JSON files, globs, '-' for stdin"
        )
    parser.add_argument(
        "--by", choices=("stage", "event", "route"), default="stage",
        help="group stage runs (default), lines with execution_time_ms by event, or "
        "'request completed' lines by method and route",
    )
    parser.add_argument(
        "--budget", type=_budget, action="append", default=[], metavar="STAGE=MS",
        help="a budget in milliseconds (repeatable; a route is 'POST /api/search'); "
        "without one, a stage's budget is taken from the log's 'budget exceeded' lines",
    )
    parser.add_argument(
        "--budgets", metavar="FILE", help="budgets from a TOML file (stage = ms, same keys as "
        "configure(budgets=...)); --budget wins",
    )
    parser.add_argument(
        "--jobs", type=at_least_one, default=None, metavar="N",
        help="processes that share a large (32 MB+) plain file (default: the CPUs, up to 2; "
        "each adds about 30 MB)",
    )
    parser.add_argument("--since", type=_time, metavar="TIME", help="only lines at or after (ISO)")
    parser.add_argument("--until", type=_time, metavar="TIME", help="only lines before (ISO)")


def budgets_of(args: argparse.Namespace) -> dict[str, float]:
    """``--budgets`` overlaid with ``--budget``, once the options are checked.

    Raises:
        ValueError: naming a bad budgets file, or a ``--since``/``--until`` window that
            holds no time.
    """
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise ValueError("--since must be before --until (the window holds no time)")
    budgets = parse_budgets(args.budgets) if args.budgets else {}
    budgets.update(dict(args.budget))
    return budgets


def load(
    args: argparse.Namespace, files: list[str], budgets: dict[str, float], details: bool = False
) -> Analysis | None:
    """Read ``files``; report unreadable inputs and bad lines on stderr.

    Returns ``None`` (after one line on stderr) when nothing at all could be read.
    """
    aggregator = Aggregator(
        by=args.by, budgets=budgets, since=args.since, until=args.until, details=details
    )
    sources, missing = expand(files)
    for pattern in missing:
        aggregator.report.unreadable[pattern] = "no such file"
    jobs = args.jobs or default_jobs()
    aggregator.feed_sources(sources, jobs=jobs)
    if aggregator.duplicates:
        print(
            f"rag-instrument: {aggregator.duplicates} log line(s) not counted again: their runs "
            "were counted from their spans",
            file=sys.stderr,
        )
    report = aggregator.report
    if report.files == 0:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.unreadable.items())
        print(f"rag-instrument: nothing could be read ({reasons or 'no input'})", file=sys.stderr)
        return None
    for name, why in report.unreadable.items():
        print(f"rag-instrument: cannot read {name}: {why}", file=sys.stderr)
    if report.bad_lines:
        print(f"rag-instrument: {report.bad_lines} unusable line(s) skipped", file=sys.stderr)
        for name, (line_no, why) in report.first_bad.items():
            print(f"  first in {name}, line {line_no}: {why}", file=sys.stderr)
    return aggregator.result()


def warn_unmatched_budgets(budgets: dict[str, float], analysis: Analysis) -> None:
    """Say on stderr which budgets given name no group of the input.

    A typo, or a stage that did not run: a CI gate on budgets must not pass by mistake.
    """
    keys = {row.key for row in analysis.rows}
    for name in budgets:
        route = route_key(name)
        if (route is not None) != (analysis.by == "route"):
            continue  # a route's budget when grouping by stage, or the other way round
        if name not in keys and (route or name) not in keys:
            print(
                f"rag-instrument: the budget for {printable(name)!r} names no "
                f"{'route' if analysis.by == 'route' else analysis.by} in the input",
                file=sys.stderr,
            )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rag-instrument analyze``."""
    try:
        budgets = budgets_of(args)
    except ValueError as exc:
        print(f"rag-instrument: {exc}", file=sys.stderr)
        return 2
    analysis = load(args, args.files, budgets)
    if analysis is None:
        return 2
    if analysis.empty:
        if args.format == "json":
            sys.stdout.write("[]\n")
        elif args.format == "table":
            print(empty_message(analysis))
        else:
            sys.stdout.write(render_csv(analysis))
        if args.format != "table":  # the output stays machine-readable: the word goes aside
            print(f"rag-instrument: {empty_message(analysis)}", file=sys.stderr)
        return 0
    warn_unmatched_budgets(budgets, analysis)
    if args.format == "json":
        sys.stdout.write(render_json(analysis))
    elif args.format == "csv":
        sys.stdout.write(render_csv(analysis))
    else:
        sys.stdout.write(render_table(analysis, colour=use_colour(sys.stdout)))
    if args.fail_on_budget:
        over = [r for r in analysis.rows if r.budget_ms is not None and r.p95_ms > r.budget_ms]
        for row in over:
            print(
                f"rag-instrument: {printable(row.key)} p95 {row.p95_ms:.1f} ms is over its "
                "budget of "
                f"{row.budget_ms:g} ms",
                file=sys.stderr,
            )
        if over:
            return 1
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``analyze``."""
    parser = subparsers.add_parser(
        "analyze",
        help="per-stage count, errors, p50/p95/p99 and budgets from logs or OTLP JSON",
        description="Per-stage count, errors, mean, p50/p95/p99, max, budget violations and "
        "where the time went (db, llm, vector, embedding, cache), with slow queries, N+1 "
        "warnings, retries, cache and budget tables beside it.",
        epilog=EPILOG,
    )
    add_input_options(parser)
    parser.add_argument(
        "--format", choices=("table", "json", "csv"), default="table",
        help="table (aligned; colour only on a terminal, NO_COLOR respected), json (a list; "
        "stage, avg_time and max_time as the README's jq pipeline computes them), csv",
    )
    parser.add_argument(
        "--fail-on-budget", action="store_true",
        help="exit 1 when a group's p95 is over its budget (a CI gate)",
    )
    parser.set_defaults(func=run)
