"""The streaming aggregation behind ``analyze``, ``compare`` and ``report``.

Each line is looked at as bytes first: a line that names none of the keys we use
(``execution_time_ms``, the ``retrying`` and N+1 events, OTLP's ``resourceSpans``) is only
checked to look like a JSON object, never parsed. The rest is parsed with orjson.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from datetime import UTC, datetime
from typing import Any, TypeGuard

import orjson

from rag_instrument.analysis import _otlp, _parallel
from rag_instrument.analysis._model import (
    TOTAL_STAGE,
    Analysis,
    Row,
)
from rag_instrument.analysis._nesting import ordered, parents_from_intervals, waterfalls
from rag_instrument.analysis._read import InputReport, Source, read_blocks
from rag_instrument.analysis._side import llm_line, record_side, side_tables
from rag_instrument.analysis._stats import DEFAULT_MAX_VALUES, Sample, percentile

__all__ = ["Aggregator", "parse_time"]

_BY = ("stage", "event", "route")
#: Traces sampled to find which stage runs inside which (from logs).
_NEST_TRACES = 2000
#: ... within the first this many stage lines.
_NEST_LINES = 20_000
#: Where an "info" line of the library's own layout says so (after a 27-character timestamp).
_INFO_HEAD = b'","level":"info","event":"'
#: Traces kept open for the slowest-request waterfalls (report mode).
_OPEN_TRACES = 4096
_WATERFALLS = 8
_SERIES_MAX = 200_000
_NUMBER = (int, float)


def parse_time(text: str) -> float:
    """ISO 8601 (``Z`` or an offset; naive means UTC) to epoch seconds; ``ValueError`` if not."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class _Group:
    __slots__ = (
        "cache_hits",
        "cache_misses",
        "cancelled",
        "count",
        "cpu_ms",
        "cpu_runs",
        "errors",
        "kinds_ms",
        "max_ms",
        "over",
        "sample",
        "series",
        "statuses",
        "total_ms",
    )

    def __init__(self, max_values: int) -> None:
        self.count = 0
        self.errors = 0
        self.cancelled = 0
        self.total_ms = 0.0
        self.max_ms = -math.inf
        self.sample = Sample(max_values)
        self.over = 0
        self.kinds_ms: dict[str, float] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        #: CPU milliseconds of the runs whose line had ``cpu_ms`` (resource_metrics), and
        #: how many those were (not every run reports it: see docs/profiling.md).
        self.cpu_ms = 0.0
        self.cpu_runs = 0
        self.statuses: Counter[str] = Counter()
        self.series: Sample | None = None


def _check_shape(line: bytes, name: str, line_no: int, bad: Any) -> None:
    stripped = line.strip()
    if stripped and (stripped[:1] != b"{" or stripped[-1:] != b"}"):
        bad(name, line_no, "not a JSON object (truncated or binary?)")


def _valid_ms(value: Any) -> TypeGuard[float]:
    return type(value) in _NUMBER and 0 <= value < math.inf


class Aggregator:
    """Feed it inputs (or parsed lines), then call :meth:`result`.

    Args:
        by: ``stage``, ``event`` or ``route``.
        budgets: milliseconds per group key (a stage, or a route as ``"POST /api/search"``).
        since: keep only lines at or after this epoch time.
        until: keep only lines before this epoch time.
        max_values: values kept per group for exact percentiles (see ``_stats``).
        details: also keep what the HTML report draws (series, waterfalls).
    """

    def __init__(
        self,
        by: str = "stage",
        budgets: dict[str, float] | None = None,
        since: float | None = None,
        until: float | None = None,
        max_values: int = DEFAULT_MAX_VALUES,
        details: bool = False,
    ) -> None:
        if by not in _BY:
            raise ValueError(f"by must be one of {', '.join(_BY)}, got {by!r}")
        self.by = by
        self.budgets = dict(budgets or {})
        self.learned_budgets: dict[str, float] = {}
        self.since = since
        self.until = until
        self.max_values = max_values
        self.details = details
        self.report = InputReport()
        self.groups: dict[str, _Group] = {}
        self.used = 0
        self.kinds: set[str] = set()
        self.slow: dict[str, dict[str, Any]] = {}
        self.n_plus_one: dict[str, dict[str, Any]] = {}
        self.retries: Counter[tuple[str, str]] = Counter()
        self.cache: dict[str, list[int]] = {}
        self.exceeded: dict[str, Counter[str]] = {}
        self.nest_traces: dict[str, list[tuple[str, float, float]]] = {}
        #: Stage lines still to parse whole, to sample which stage runs inside which.
        self.nest_left = _NEST_LINES
        #: OTLP span id -> (parent span id, stage or None), to nest stages.
        self.otlp_spans: dict[str, tuple[str | None, str | None]] = {}
        self.open_traces: OrderedDict[str, list[tuple[str, float, float]]] = OrderedDict()
        self.slowest: list[tuple[float, str, list[tuple[str, float, float]]]] = []

    # --- input -------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The constructor's arguments (a worker process builds its own aggregator)."""
        return {
            "by": self.by,
            "budgets": self.budgets,
            "since": self.since,
            "until": self.until,
            "max_values": self.max_values,
            "details": self.details,
        }

    def feed_source(self, source: Source, jobs: int = 1) -> None:
        """Read one input to the end; a large plain file with up to ``jobs`` processes.

        The HTML report's details (series, waterfalls) are always read by one process.
        """
        if not self.details and _parallel.worth_it(source, jobs):
            _parallel.feed_parallel(self, source, jobs, _read_range)
            return
        for first, lines in read_blocks(source, self.report):
            self.feed_lines(source.name, first, lines)

    def feed_lines(self, name: str, first: int, lines: list[bytes]) -> None:
        """Aggregate a block of raw lines; ``first`` is the first one's line number.

        Lines that name none of the keys used are not parsed, only checked to look like a
        JSON object (``{...}``); the rest are parsed.
        """
        if self.by == "stage" and self.since is None and self.until is None and not self.details:
            self._feed_stage_lines(name, first, lines)
            return
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        bad = self.report.bad
        line_no = first - 1
        for line in lines:
            line_no += 1
            if b"execution_time_ms" not in line and b'"retrying"' not in line and (
                b"n+1 query" not in line and b"resourceSpans" not in line
            ):
                if line[:1] != b"{" or line[-1:] != b"}":
                    _check_shape(line, name, line_no, bad)
                continue
            try:
                record = loads(line)
            except decode_error:
                bad(name, line_no, "not valid JSON (truncated or binary?)")
                continue
            if type(record) is not dict:
                bad(name, line_no, "not a JSON object")
                continue
            problem = self.feed(record)
            if problem:
                bad(name, line_no, problem)

    def _feed_stage_lines(self, name: str, first: int, lines: list[bytes]) -> None:
        """The hot path of ``--by stage``: stage lines and LLM lines handled inline."""
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        bad = self.report.bad
        groups = self.groups
        budgets = self.budgets
        nest_traces = self.nest_traces
        nest_left = self.nest_left
        used = 0
        block: dict[str, list[float]] = {}
        line_no = first - 1
        for line in lines:
            line_no += 1
            record = None
            info = False
            if line.startswith(_INFO_HEAD, 41) and line.startswith(b'{"timestamp":"'):
                # An "info" line in the library's own layout: what it is shows at fixed
                # places, so it is classified without scanning it all, and only the part
                # of it that is used gets parsed.
                at = line.find(b',"context":{', 67)
                if at > 0 and line.startswith(b'"pipeline_stage":"', at + 12):
                    if nest_left <= 0:  # (while sampling nesting, the ids are needed too)
                        try:
                            record = loads(b"{" + line[at + 1 :])
                            info = True
                        except decode_error:
                            record = None  # parsed whole below, and reported
                elif line.startswith(b'llm call completed"', 67):
                    llm_line(self, line, name, line_no)
                    continue
                else:
                    if line[-1:] != b"}":
                        _check_shape(line, name, line_no, bad)
                    continue
            elif b"pipeline_stage" not in line:
                if b'"cache_hit"' in line:
                    llm_line(self, line, name, line_no)
                elif (
                    b'"retrying"' in line or b"budget exceeded" in line or b"resourceSpans" in line
                ):
                    try:
                        record = loads(line)
                    except decode_error:
                        bad(name, line_no, "not valid JSON (truncated or binary?)")
                        continue
                    problem = self.feed(record) if type(record) is dict else "not a JSON object"
                    if problem:
                        bad(name, line_no, problem)
                elif line[:1] != b"{" or line[-1:] != b"}":
                    _check_shape(line, name, line_no, bad)
                continue
            if record is None:
                try:
                    record = loads(line)
                except decode_error:
                    bad(name, line_no, "not valid JSON (truncated or binary?)")
                    continue
                if type(record) is not dict:
                    bad(name, line_no, "not a JSON object")
                    continue
            context = record.get("context")
            stage = context.get("pipeline_stage") if type(context) is dict else None
            if type(stage) is not str or "execution_time_ms" not in record:
                problem = self.feed(record)  # slow query / N+1 lines, app lines
                if problem:
                    bad(name, line_no, problem)
                continue
            ms = record["execution_time_ms"]
            if (type(ms) is not float and type(ms) is not int) or not 0.0 <= ms < math.inf:
                bad(name, line_no, "execution_time_ms is not a non-negative number")
                continue
            # Durations are gathered per block and added to the groups once per block.
            durations = block.get(stage)
            if durations is None:
                durations = block[stage] = []
                if stage not in groups:
                    groups[stage] = _Group(self.max_values)
            durations.append(ms)
            cpu = record.get("cpu_ms")
            if cpu is not None and (type(cpu) is float or type(cpu) is int) and 0 <= cpu < math.inf:
                cpu_group = groups[stage]
                cpu_group.cpu_ms += cpu
                cpu_group.cpu_runs += 1
            if not info:
                level = record.get("level")
                if level in {"error", "critical"}:
                    groups[stage].errors += 1
                elif "error_type" in record and level == "warning":
                    groups[stage].cancelled += 1
            breakdown = record.get("breakdown")
            if breakdown and type(breakdown) is dict:
                group = groups[stage]
                kinds_ms = group.kinds_ms
                for kind, entry in breakdown.items():
                    if type(entry) is not dict:
                        continue
                    if kind == "cache":
                        self._cache_counts(group, entry)
                        continue
                    part = entry.get("ms")
                    if (type(part) is float or type(part) is int) and 0 <= part < math.inf:
                        kinds_ms[kind] = kinds_ms.get(kind, 0.0) + part
            if nest_left > 0:
                nest_left -= 1
                if len(nest_traces) < _NEST_TRACES or record.get("trace_id") in nest_traces:
                    self._place(stage, float(ms), record, None)
        self.nest_left = nest_left
        for stage, durations in block.items():
            group = groups[stage]
            used += len(durations)
            group.count += len(durations)
            group.total_ms += sum(durations)
            group.max_ms = max(group.max_ms, max(durations))  # noqa: PLW3301 - no unpacking
            budget = budgets.get(stage)
            if budget is not None:
                group.over += sum(1 for ms in durations if ms > budget)
            sample = group.sample
            room = sample.max_values - sample.seen
            if room >= len(durations):
                sample.values.extend(durations)
                sample.seen += len(durations)
            else:
                for ms in durations:
                    sample.add(ms)
        if used:
            self.used += used
            self.kinds.add("log")

    def feed(self, record: dict[str, Any]) -> str | None:
        """Aggregate one parsed line; return what was wrong with it, if anything."""
        if "resourceSpans" in record:
            self.kinds.add("otlp")
            return _otlp.feed(self, record)
        self.kinds.add("log")
        ts: float | None = None
        if self.since is not None or self.until is not None:
            ts = self._time(record)
            if ts is None:
                return "no usable timestamp"
            if (self.since is not None and ts < self.since) or (
                self.until is not None and ts >= self.until
            ):
                return None
        event = record.get("event")
        if "execution_time_ms" in record and (self.by != "route" or event == "request completed"):
            ms = record["execution_time_ms"]
            if not _valid_ms(ms):
                return "execution_time_ms is not a non-negative number"
            context = record.get("context")
            stage = context.get("pipeline_stage") if type(context) is dict else None
            key: Any
            if self.by == "stage":
                key = stage
            elif self.by == "event":
                key = event
            else:
                key = None
                if event == "request completed":
                    route = record.get("route") or "(no route)"
                    key = f"{record.get('method') or '?'} {route}"
            if key is not None and type(key) is str:
                self.run(key, float(ms), record, ts)
                if self.by == "stage" and (self.details or len(self.nest_traces) < _NEST_TRACES):
                    self._place(key, float(ms), record, ts)
        if type(event) is str and record.get("logger") == "rag_instrument":
            record_side(self, event, record)
        return None

    # --- groups ----------------------------------------------------------------------

    def run(self, key: str, ms: float, record: dict[str, Any], ts: float | None) -> None:
        """Count one run of ``key`` lasting ``ms`` (``record`` as a log line's fields)."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(self.max_values)
        self.used += 1
        group.count += 1
        group.total_ms += ms
        group.max_ms = max(group.max_ms, ms)
        group.sample.add(ms)
        level = record.get("level")
        if level in {"error", "critical"}:
            group.errors += 1
        elif "error_type" in record and level == "warning":
            group.cancelled += 1
        status = record.get("status")
        if type(status) is int:
            group.statuses[f"{status // 100}xx"] += 1
            if status >= 500 and level not in ("error", "critical"):
                group.errors += 1
        budget = self.budgets.get(key)
        if budget is not None and ms > budget:
            group.over += 1
        cpu = record.get("cpu_ms")
        if _valid_ms(cpu):
            group.cpu_ms += cpu
            group.cpu_runs += 1
        breakdown = record.get("breakdown")
        if type(breakdown) is dict:
            self._breakdown(group, breakdown)
        if self.details:
            self._point(group, record, ts, ms)

    def _breakdown(self, group: _Group, breakdown: dict[str, Any]) -> None:
        kinds = group.kinds_ms
        for kind, entry in breakdown.items():
            if type(entry) is not dict:
                continue
            if kind == "cache":
                self._cache_counts(group, entry)
                continue
            ms = entry.get("ms")
            if _valid_ms(ms):
                kinds[kind] = kinds.get(kind, 0.0) + ms

    @staticmethod
    def _cache_counts(group: _Group, entry: dict[str, Any]) -> None:
        hits, misses = entry.get("hits", 0), entry.get("misses", 0)
        if type(hits) is int and type(misses) is int and hits >= 0 and misses >= 0:
            group.cache_hits += hits
            group.cache_misses += misses

    def _point(self, group: _Group, record: dict[str, Any], ts: float | None, ms: float) -> None:
        if ts is None:
            ts = self._time(record)
        if ts is None:
            return
        if group.series is None:
            group.series = Sample(_SERIES_MAX)
        # Two floats per point: time and value, interleaved in one array.
        group.series.add(ts)
        group.series.add(ms)

    @staticmethod
    def _time(record: dict[str, Any]) -> float | None:
        text = record.get("timestamp")
        if type(text) is not str:
            return None
        try:
            return parse_time(text)
        except ValueError:
            return None

    # --- nesting and waterfalls ---------------------------------------------------------

    def _place(self, stage: str, ms: float, record: dict[str, Any], ts: float | None) -> None:
        trace = record.get("trace_id")
        if type(trace) is not str:
            return
        if ts is None:
            ts = self._time(record)
            if ts is None:
                return
        self.interval(trace, stage, ts * 1000.0 - ms, ts * 1000.0)

    def interval(self, trace: str, stage: str, start_ms: float, end_ms: float) -> None:
        """Note that ``stage`` ran from ``start_ms`` to ``end_ms`` (epoch ms) in ``trace``."""
        entry = (stage, start_ms, end_ms)
        runs = self.nest_traces.get(trace)
        if runs is not None:
            runs.append(entry)
        elif len(self.nest_traces) < _NEST_TRACES:
            self.nest_traces[trace] = [entry]
        if not self.details:
            return
        open_runs = self.open_traces.get(trace)
        if open_runs is None:
            open_runs = self.open_traces[trace] = []
            if len(self.open_traces) > _OPEN_TRACES:
                self.open_traces.popitem(last=False)
        open_runs.append(entry)
        if stage == TOTAL_STAGE:
            item = (end_ms - start_ms, trace, list(open_runs))
            if len(self.slowest) < _WATERFALLS:
                heapq.heappush(self.slowest, item)
            elif item[0] > self.slowest[0][0]:
                heapq.heapreplace(self.slowest, item)

    def _parents(self) -> dict[str, str]:
        if self.otlp_spans:
            return _otlp.parents(self.otlp_spans)
        return parents_from_intervals(self.nest_traces)

    # --- result ----------------------------------------------------------------------

    def result(self) -> Analysis:
        """Rows in pipeline order with nesting, and the side tables."""
        parents = self._parents() if self.by == "stage" else {}
        order = ordered(list(self.groups), parents)
        rows: list[Row] = []
        samples: dict[str, list[float]] = {}
        series: dict[str, list[tuple[float, float]]] = {}
        for key, depth in order:
            group = self.groups[key]
            values = group.sample.sorted()
            samples[key] = values
            rows.append(self._row(key, group, values, depth, parents.get(key)))
            if group.series is not None:
                flat = group.series.values
                pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
                series[key] = sorted(pairs)
        return Analysis(
            by=self.by,
            rows=rows,
            inputs=self.report,
            **side_tables(self),
            samples=samples,
            series=series,
            waterfalls=waterfalls(self.slowest, parents),
            used=self.used,
            kinds=self.kinds,
        )

    def _row(
        self, key: str, group: _Group, values: list[float], depth: int, parent: str | None
    ) -> Row:
        count = group.count
        budget = self.budgets.get(key)
        over: int | None = group.over
        if budget is None:
            # The budget the log itself reports ("budget exceeded" lines carry budget_ms).
            budget = self.learned_budgets.get(key)
            if budget is None:
                over = None
            elif group.sample.exact:
                over = sum(1 for v in values if v > budget)
            else:
                over = self.exceeded.get(key, Counter()).total()
        lookups = group.cache_hits + group.cache_misses
        return Row(
            key=key,
            count=count,
            errors=group.errors,
            cancelled=group.cancelled,
            avg_ms=group.total_ms / count,
            p50_ms=percentile(values, 50),
            p95_ms=percentile(values, 95),
            p99_ms=percentile(values, 99),
            max_ms=group.max_ms,
            budget_ms=budget,
            over_budget=over,
            breakdown_ms={k: v / count for k, v in sorted(group.kinds_ms.items())},
            breakdown_share={
                k: (v / group.total_ms if group.total_ms else 0.0)
                for k, v in sorted(group.kinds_ms.items())
            },
            cache_hit_ratio=group.cache_hits / lookups if lookups else None,
            avg_cpu_ms=group.cpu_ms / group.cpu_runs if group.cpu_runs else None,
            cpu_runs=group.cpu_runs,
            depth=depth,
            parent=parent,
            is_total=self.by == "stage" and key == TOTAL_STAGE,
            exact=group.sample.exact,
            statuses=dict(sorted(group.statuses.items())),
        )


def _read_range(options: dict[str, Any], source: Source) -> Aggregator:
    """One worker's share of a file: a new aggregator over ``source``'s byte range."""
    aggregator = Aggregator(**options)
    aggregator.feed_source(source, jobs=1)
    return aggregator
