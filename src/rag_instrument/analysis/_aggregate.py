"""The streaming aggregation behind ``analyze``, ``compare`` and ``report``.

Each line is looked at as bytes first: a line that names none of the keys and events used
(``pipeline_stage`` or ``execution_time_ms``, ``cache_hit``, the side tables' events,
OTLP's ``resourceSpans``) and holds no escape is only checked to look like a JSON object,
never parsed; the rest is parsed whole with orjson (the *exact path*). ``--by stage``
without filters reads chunks through the fast path of :mod:`._fast`, which gives the same
figures.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeGuard

import orjson

from rag_instrument._utils import route_key
from rag_instrument.analysis import _fast, _otlp, _parallel
from rag_instrument.analysis._model import (
    TOTAL_STAGE,
    Analysis,
    Row,
)
from rag_instrument.analysis._nesting import ordered, parents_from_intervals, waterfalls
from rag_instrument.analysis._read import InputReport, Source, read_blocks, read_chunks
from rag_instrument.analysis._side import record_side, side_tables
from rag_instrument.analysis._stats import DEFAULT_MAX_VALUES, ExactSum, Sample, percentile

__all__ = ["Aggregator", "parse_time"]

_BY = ("stage", "event", "route")
#: Traces sampled to find which stage runs inside which (from logs).
_NEST_TRACES = 2000
#: ... within the first this many stage lines.
_NEST_LINES = 5_000
#: A line holding none of these (and no escape) cannot change the result.
_SIDE_MARKERS = (
    b"cache_hit", b"resourceSpans", b"slow query", b"n+1 query detected", b"retrying",
    b"budget exceeded", b"\\",
)
_MARKERS = {
    "stage": (b"pipeline_stage", *_SIDE_MARKERS),
    "event": (b"execution_time_ms", *_SIDE_MARKERS),
    "route": (b"execution_time_ms", *_SIDE_MARKERS),
}
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
        self.total_ms = ExactSum()
        self.max_ms = -math.inf
        self.sample = Sample(max_values)
        self.over = 0
        self.kinds_ms: dict[str, ExactSum] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        #: CPU milliseconds of the runs whose line had ``cpu_ms`` (resource_metrics), and
        #: how many those were (not every run reports it: see docs/profiling.md).
        self.cpu_ms = ExactSum()
        self.cpu_runs = 0
        self.statuses: Counter[str] = Counter()
        self.series: Sample | None = None


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
        # A route's budget in any case, as configure() takes it ("post /api/search").
        self.budgets = {route_key(key) or key: ms for key, ms in (budgets or {}).items()}
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
        #: The span ids of the runs counted from OTLP spans: the same run's log line (it
        #: carries the span id) is not counted again when spans and logs are read together.
        self.otlp_runs: set[str] = set()
        #: Per trace, the requests counted from OTLP spans (``--by route``): key, start, end.
        self.otlp_requests: dict[str, list[tuple[str, int, int]]] = {}
        #: Whether rag_instrument's own request spans were seen (then only they count).
        self.otlp_own_requests = False
        #: Other instrumentations' request spans, held back until the end (``--by route``).
        self.otlp_foreign: list[Any] = []
        #: Whether those are counted as they come (too many held back, none of ours seen).
        self.otlp_foreign_counted = False
        #: Log lines skipped because their run was counted from its span.
        self.duplicates = 0
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

    def feed_sources(self, sources: list[Source], jobs: int = 1) -> None:
        """Read inputs to the end, those holding OTLP spans first (see :attr:`otlp_runs`)."""
        spans = [source for source in sources if _holds_spans(source)]
        for source in spans + [source for source in sources if source not in spans]:
            self.feed_source(source, jobs=jobs)

    def feed_source(self, source: Source, jobs: int = 1) -> None:
        """Read one input to the end; a large plain file with up to ``jobs`` processes.

        The HTML report's details (series, waterfalls) are always read by one process, and
        so are logs read after spans (each stage line is checked against them).
        """
        if self.otlp_runs:
            for first, lines in read_blocks(source, self.report):
                self.feed_lines(source.name, first, lines)
            return
        if not self.details and _parallel.worth_it(source, jobs):
            _parallel.feed_parallel(self, source, jobs, _read_range)
            return
        if self.by == "stage" and self.since is None and self.until is None and not self.details:
            line_no = 1
            for chunk in read_chunks(source, self.report):
                if chunk is None:
                    self.report.bad(source.name, line_no, "line too long")
                    count = 1
                else:
                    count = _fast.feed_chunk(self, source.name, line_no, chunk)
                self.report.lines += count
                line_no += count
            return
        for first, lines in read_blocks(source, self.report):
            self.feed_lines(source.name, first, lines)

    def feed_lines(
        self,
        name: str,
        first: int,
        lines: list[bytes],
        numbering: Callable[[int], int] | None = None,
    ) -> None:
        """Aggregate a block of raw lines; ``first`` is the first one's line number.

        Lines that name none of the keys used are not parsed, only checked to look like a
        JSON object (``{...}``); the rest are parsed whole. ``numbering`` maps a line's
        index in ``lines`` to its line number when they are not consecutive.
        """
        self.feed_text(name, first, b"\n".join(lines), numbering)

    def feed_text(
        self,
        name: str,
        first: int,
        text: bytes,
        numbering: Callable[[int], int] | None = None,
    ) -> None:
        """:meth:`feed_lines` for lines joined by newlines (no newline at the end)."""

        def line_no(start: int) -> int:
            index = text.count(b"\n", 0, start)
            return numbering(index) if numbering else first + index

        # The start of each line that names a marker, found with bytes.find (fast).
        wanted: set[int] = set()
        for marker in _MARKERS[self.by]:
            at = text.find(marker)
            while at >= 0:
                wanted.add(text.rfind(b"\n", 0, at) + 1)
                at = text.find(b"\n", at)
                if at < 0:
                    break
                at = text.find(marker, at)
        lines = text.count(b"\n") + 1
        if (
            text.count(b"\n{") + text.startswith(b"{") == lines
            and text.count(b"}\n") + text.endswith(b"}") == lines
        ):  # every line looks like an object: only the wanted ones need a look
            for start in sorted(wanted):
                end = text.find(b"\n", start)
                self._parse(name, text[start : end if end >= 0 else len(text)], start, line_no)
            return
        start = 0
        for line in text.split(b"\n"):
            if start in wanted:
                self._parse(name, line, start, line_no)
            elif line[:1] != b"{" or line[-1:] != b"}":
                stripped = line.strip()
                if stripped and (stripped[:1] != b"{" or stripped[-1:] != b"}"):
                    self.report.bad(
                        name, line_no(start), "not a JSON object (truncated or binary?)"
                    )
            start += len(line) + 1

    def feed_every_line(self, name: str, first: int, lines: list[bytes]) -> None:
        """Parse and aggregate every line, skipping none: the reference the others match."""
        for index, line in enumerate(lines):
            if line.strip():
                self._parse(name, line, index, lambda index: first + index)

    def _parse(self, name: str, line: bytes, where: int, line_no: Callable[[int], int]) -> None:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            record = _lenient(line)
        if record is None:
            problem: str | None = "not valid JSON (truncated or binary?)"
        else:
            problem = self.feed(record) if type(record) is dict else "not a JSON object"
        if problem:
            self.report.bad(name, line_no(where), problem)

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
                if stage is not None and type(stage) is not str:
                    return "context.pipeline_stage is not a string"
                key = stage
            elif self.by == "event":
                # A budget warning repeats the time of a run its stage (or request) line
                # already counts: it is no run of an event of its own.
                is_warning = event == "budget exceeded" and record.get("logger") == "rag_instrument"
                key = None if is_warning else event
            else:
                key = None
                if event == "request completed":
                    route = record.get("route") or "(no route)"
                    key = f"{record.get('method') or '?'} {route}"
            if key is not None and type(key) is str:
                if self.otlp_runs and record.get("span_id") in self.otlp_runs:
                    self.duplicates += 1  # counted from its span already
                    return None
                self.run(key, float(ms), record, ts)
                if self.by == "stage" and self.details:
                    self._place(key, float(ms), record, ts)
                elif self.by == "stage" and self.nest_left > 0:
                    # Nesting is sampled from the first stage lines (of each range read).
                    self.nest_left -= 1
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
        group.total_ms.add(ms)
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
            group.cpu_ms.add(cpu)
            group.cpu_runs += 1
        breakdown = record.get("breakdown")
        if type(breakdown) is dict:
            self.breakdown(group, breakdown)
        if self.details:
            self._point(group, record, ts, ms)

    def breakdown(self, group: _Group, breakdown: dict[str, Any]) -> None:
        """Add one run's ``breakdown`` (time per kind, cache hits) to ``group``."""
        kinds = group.kinds_ms
        for kind, entry in breakdown.items():
            if type(entry) is not dict:
                continue
            if kind == "cache":
                self._cache_counts(group, entry)
                continue
            ms = entry.get("ms")
            if _valid_ms(ms):
                total = kinds.get(kind)
                if total is None:
                    total = kinds[kind] = ExactSum()
                total.add(ms)

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
        if self.otlp_foreign:
            _otlp.settle_routes(self)
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
        total_ms = group.total_ms.value()
        kinds_ms = {kind: total.value() for kind, total in sorted(group.kinds_ms.items())}
        return Row(
            key=key,
            count=count,
            errors=group.errors,
            cancelled=group.cancelled,
            avg_ms=total_ms / count,
            p50_ms=percentile(values, 50),
            p95_ms=percentile(values, 95),
            p99_ms=percentile(values, 99),
            max_ms=group.max_ms,
            budget_ms=budget,
            over_budget=over,
            breakdown_ms={k: v / count for k, v in kinds_ms.items()},
            breakdown_share={k: (v / total_ms if total_ms else 0.0) for k, v in kinds_ms.items()},
            cache_hit_ratio=group.cache_hits / lookups if lookups else None,
            avg_cpu_ms=group.cpu_ms.value() / group.cpu_runs if group.cpu_runs else None,
            cpu_runs=group.cpu_runs,
            depth=depth,
            parent=parent,
            is_total=self.by == "stage" and key == TOTAL_STAGE,
            exact=group.sample.exact,
            statuses=dict(sorted(group.statuses.items())),
        )


def _holds_spans(source: Source) -> bool:
    """Whether ``source``'s first line is an OTLP request (a Collector's file exporter)."""
    # Only a regular file can be read twice: a pipe's or a FIFO's bytes, once peeked at,
    # would be gone for the reading proper.
    if source.name == "-" or source.start or not os.path.isfile(source.name):
        return False
    try:
        with source.open() as stream:
            head = stream.read(1 << 16)
    except (OSError, EOFError, ValueError, zlib.error):
        return False
    return b'"resourceSpans"' in head.lstrip().split(b"\n", 1)[0]


def _read_range(options: dict[str, Any], source: Source) -> Aggregator:
    """One worker's share of a file: a new aggregator over ``source``'s byte range."""
    aggregator = Aggregator(**options)
    aggregator.feed_source(source, jobs=1)
    return aggregator


def _lenient(line: bytes) -> Any:
    r"""A line orjson refuses that is still JSON, as jq and ``json`` read it, or ``None``.

    Escaped lone surrogates (``"\udc80"``, which Python's ``json.dumps`` writes for text
    decoded with ``surrogateescape``) are valid JSON text but no Unicode: they become
    U+FFFD, so that everything downstream (tables, JSON out) has proper text.
    """
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return _without_surrogates(record)


def _without_surrogates(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not text
            return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
        return value
    if kind is list:
        return [_without_surrogates(v) for v in value]
    if kind is dict:
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value
