"""What an analysis produces: rows per group and the side tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rag_instrument.analysis._read import InputReport

__all__ = [
    "BREAKDOWN_KINDS",
    "PIPELINE_ORDER",
    "TOTAL_STAGE",
    "Analysis",
    "Row",
    "Waterfall",
]

#: Rows come in this order (then the others in order of first appearance).
PIPELINE_ORDER = ("query_rewriting", "embedding", "retrieval", "reranking", "generation")
#: The stage that is the whole request.
TOTAL_STAGE = "search"
#: Breakdown kinds shown as columns (others are kept in ``Row.breakdown_ms``).
BREAKDOWN_KINDS = ("db", "llm", "vector", "embedding")


@dataclass
class Row:
    """One group: a stage, an event or a route."""

    key: str
    count: int
    errors: int
    cancelled: int
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    budget_ms: float | None
    #: Runs over the budget (``None`` when no budget is known).
    over_budget: int | None
    #: Mean milliseconds per run spent in each breakdown kind.
    breakdown_ms: dict[str, float]
    #: Each kind's share of the group's time (0..1).
    breakdown_share: dict[str, float]
    cache_hit_ratio: float | None
    #: Mean ``cpu_ms`` of the runs that reported it (``configure(resource_metrics=True)``),
    #: beside ``avg_ms``: close to it, the stage computed; far below, it waited.
    avg_cpu_ms: float | None = None
    #: How many runs reported ``cpu_ms``.
    cpu_runs: int = 0
    depth: int = 0
    parent: str | None = None
    is_total: bool = False
    #: Percentiles are over every value (``False``: over a uniform sample of them).
    exact: bool = True
    statuses: dict[str, int] = field(default_factory=dict)

    def as_json(self, by: str) -> dict[str, Any]:
        """The row as ``--format json`` prints it (``avg_time``/``max_time`` as jq's)."""
        out: dict[str, Any] = {by: self.key}
        if by == "stage":
            out["avg_time"] = self.avg_ms
            out["max_time"] = self.max_ms
        out.update(
            count=self.count,
            errors=self.errors,
            cancelled=self.cancelled,
            avg_ms=self.avg_ms,
            p50_ms=self.p50_ms,
            p95_ms=self.p95_ms,
            p99_ms=self.p99_ms,
            max_ms=self.max_ms,
            budget_ms=self.budget_ms,
            over_budget=self.over_budget,
            # The contract's words for the same two figures.
            budget=self.budget_ms,
            violations=self.over_budget,
            breakdown_ms=self.breakdown_ms,
            breakdown_share=self.breakdown_share,
            cache_hit_ratio=self.cache_hit_ratio,
            avg_cpu_ms=self.avg_cpu_ms,
            cpu_runs=self.cpu_runs,
            parent=self.parent,
            depth=self.depth,
            whole_request=self.is_total,
            exact_percentiles=self.exact,
        )
        if self.statuses:
            out["statuses"] = self.statuses
        return out


@dataclass
class Waterfall:
    """One slow request: its stages as offsets from the request's start."""

    trace_id: str
    total_ms: float
    #: ``(stage, start offset ms, duration ms, depth)``, in start order.
    stages: list[tuple[str, float, float, int]]


@dataclass
class Analysis:
    """The result of reading one set of inputs."""

    by: str
    rows: list[Row]
    inputs: InputReport
    #: Statement shape -> {count, total_ms, worst_ms, stages}.
    slow_queries: list[dict[str, Any]] = field(default_factory=list)
    #: Relationship (or statement) -> {warnings, max_count, stages}.
    n_plus_one: list[dict[str, Any]] = field(default_factory=list)
    #: (target, error type) -> count.
    retries: list[dict[str, Any]] = field(default_factory=list)
    #: Cache namespace -> hits, lookups, ratio.
    cache: list[dict[str, Any]] = field(default_factory=list)
    #: Stage -> times exceeded and what was largest each time.
    budget_exceeded: list[dict[str, Any]] = field(default_factory=list)
    #: Sorted kept values per group (for ``compare`` and the report).
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: Per group ``(epoch seconds, ms)`` points, report mode only.
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: The slowest requests, report mode only.
    waterfalls: list[Waterfall] = field(default_factory=list)
    #: Lines that were used (stage lines, spans, warnings).
    used: int = 0
    #: What the input was: ``"log"``, ``"otlp"`` or both.
    kinds: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        """Nothing to report: no group has a run."""
        return not self.rows
