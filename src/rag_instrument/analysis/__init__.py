"""Offline analysis of rag_instrument logs and OTLP JSON span files.

What ``rag-instrument analyze``, ``compare`` and ``report`` are built on::

    from rag_instrument.analysis import analyze

    result = analyze(["logs/rag.jsonl"], budgets={"retrieval": 60})
    for row in result.rows:
        print(row.key, row.count, row.p95_ms, row.over_budget)
"""

from __future__ import annotations

from collections.abc import Iterable

from rag_instrument.analysis._aggregate import Aggregator, parse_time
from rag_instrument.analysis._model import (
    BREAKDOWN_KINDS,
    PIPELINE_ORDER,
    TOTAL_STAGE,
    Analysis,
    Row,
    Waterfall,
)
from rag_instrument.analysis._read import InputReport, Source, expand
from rag_instrument.analysis._stats import DEFAULT_MAX_VALUES, mann_whitney_u, percentile

__all__ = [
    "BREAKDOWN_KINDS",
    "DEFAULT_MAX_VALUES",
    "PIPELINE_ORDER",
    "TOTAL_STAGE",
    "Aggregator",
    "Analysis",
    "InputReport",
    "Row",
    "Source",
    "Waterfall",
    "analyze",
    "expand",
    "mann_whitney_u",
    "parse_time",
    "percentile",
]


def analyze(
    inputs: Iterable[str],
    *,
    by: str = "stage",
    budgets: dict[str, float] | None = None,
    since: float | None = None,
    until: float | None = None,
    max_values: int = DEFAULT_MAX_VALUES,
    details: bool = False,
) -> Analysis:
    """Read log files (paths, globs, ``-`` for stdin, ``.gz``) and aggregate them.

    Inputs that match nothing or cannot be read are listed in ``result.inputs.unreadable``;
    unusable lines are counted in ``result.inputs.bad_lines``. Never raises for bad input.

    Args:
        inputs: paths or glob patterns; ``-`` is standard input.
        by: group by ``stage`` (default), ``event`` or ``route``.
        budgets: milliseconds per group; without one, a stage's budget comes from the
            log's ``"budget exceeded"`` lines when it has any.
        since: only lines at or after this epoch time (seconds).
        until: only lines before this epoch time.
        max_values: values kept per group for exact percentiles.
        details: also keep the series and waterfalls the HTML report draws.
    """
    aggregator = Aggregator(
        by=by, budgets=budgets, since=since, until=until, max_values=max_values, details=details
    )
    sources, missing = expand(list(inputs))
    for pattern in missing:
        aggregator.report.unreadable[pattern] = "no such file"
    aggregator.feed_sources(sources)
    return aggregator.result()
