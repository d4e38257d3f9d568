"""The library's own histograms and counters, aggregated where they are recorded.

The OpenTelemetry SDK's ``Histogram.record`` does a lot per measurement: a ``Measurement``
object with its attributes cleaned and copied, the exemplar filter, then per reader a
hashed attribute key, a lock, the aggregation and the exemplar reservoir (11 to 65 us a
point on our 2-core machines; 15 points a request in the example RAG app). The library
records its own instruments itself instead: one tuple key, one lock, a few additions, and
an exemplar only when the filter asks for one (a few microseconds). At collection time
each of the SDK's readers gets the same data points the SDK would have produced, merged
into what the SDK collected for everything else (the observable instruments, and any
instrument the application created on the same provider).

The data model follows the SDK's default aggregations exactly (checked by tests against
the SDK itself, both temporalities, several readers):

* histograms: explicit buckets with the SDK's default boundaries, count, sum, min, max;
  the aligned-bucket exemplar reservoir (the last exemplar of each bucket per collection);
* counters: a monotonic sum; a one-exemplar reservoir (uniform over the collection);
* cumulative points cover every attribute set ever seen, from its first measurement;
  delta points cover the attribute sets measured since the reader's previous collection;
* the cardinality limit: attribute sets beyond a reader's limit (2,000 unless the reader
  says otherwise) go to the ``otel.metric.overflow`` point;
* a negative value is dropped with a warning, as the SDK does.

Two small differences remain: an exemplar on the overflow point carries no filtered
attributes (the SDK's carries the measurement's own), and the attribute sets counted
against the cardinality limit are those ever seen, also for a delta reader (the SDK
starts a delta reader's count again at each collection).

It is used only on a meter provider ``configure()`` built itself, and only when every
reader uses the default aggregations (what a reader or the OTLP exporter's environment
variables prefer otherwise, e.g. exponential histograms, goes to the SDK's instruments
unchanged). It reaches two things the SDK keeps private: a reader's collect callback
(``MetricReader._collect``, set by the provider; wrapped so that a collection adds our
points) and the reader's per-instrument preferences (``_instrument_class_temporality``,
``_instrument_class_aggregation``, ``_instrument_class_cardinality_limit``). If either is
missing (another SDK version), the library's instruments are the SDK's, as before.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    Exemplar,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.view import (
    DefaultAggregation,
    ExplicitBucketHistogramAggregation,
    SumAggregation,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from rag_instrument._context import current_span
from rag_instrument._leaf import CONTEXT_IS_TUPLE
from rag_instrument._utils import renew_after_fork

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from opentelemetry.context import Context
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource

__all__ = ["MetricsHub", "build_hub"]

_logger = logging.getLogger("rag_instrument")

#: The SDK's default explicit bucket boundaries (``ExplicitBucketHistogramAggregation()``).
BOUNDARIES: tuple[float, ...] = (
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0,
    7500.0, 10000.0,
)  # fmt: skip
_DEFAULT_LIMIT = 2000
_OVERFLOW: dict[str, Any] = {"otel.metric.overflow": True}
_OVERFLOW_KEY: frozenset[tuple[str, Any]] = frozenset(_OVERFLOW.items())

# How exemplars are chosen (the provider's exemplar filter).
_EXEMPLARS_OFF, _EXEMPLARS_TRACE, _EXEMPLARS_ON, _EXEMPLARS_CUSTOM = 0, 1, 2, 3

#: An exemplar as recorded: value, time, span id, trace id, whether it had attributes.
_Sample = tuple[float, int, int | None, int | None, bool]

_get_current_span = trace_api.get_current_span
_INVALID_SPAN = trace_api.INVALID_SPAN
_SAMPLED = int(trace_api.TraceFlags.SAMPLED)


def _frozen(attributes: Mapping[str, Any] | None) -> frozenset[tuple[str, Any]]:
    """An attribute set as a hashable key (sequences as tuples), order not counted."""
    if not attributes:
        return frozenset()
    return frozenset(
        (k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in attributes.items()
    )


class _Series:
    """One attribute set's aggregate over an interval (or, for a reader, since the start)."""

    __slots__ = (
        "attributes",
        "buckets",
        "count",
        "exemplars",
        "high",
        "low",
        "seen",
        "start",
        "total",
    )

    def __init__(self, attributes: dict[str, Any], start: int, buckets: int) -> None:
        self.attributes = attributes
        self.start = start
        self.count = 0
        self.total: float = 0
        self.low = math.inf
        self.high = -math.inf
        # Histograms: counts per bucket, and the last exemplar per bucket (or None).
        # Counters: no buckets; one exemplar slot, ``seen`` the exemplars offered.
        self.buckets = [0] * buckets
        self.exemplars: list[_Sample | None] = [None] * max(buckets, 1)
        self.seen = 0

    def copy(self) -> _Series:
        new = _Series(self.attributes, self.start, 0)
        new.count = self.count
        new.total = self.total
        new.low = self.low
        new.high = self.high
        new.buckets = list(self.buckets)
        new.exemplars = list(self.exemplars)
        new.seen = self.seen
        return new

    def merge(self, other: _Series) -> None:
        """Add ``other`` (the same instrument, a later interval) to this one."""
        self.count += other.count
        self.total += other.total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        if other.buckets:
            self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
            for i, exemplar in enumerate(other.exemplars):  # the last of each bucket
                if exemplar is not None:
                    self.exemplars[i] = exemplar
        elif other.seen:
            # One exemplar, chosen uniformly over both intervals.
            seen = self.seen + other.seen
            if self.exemplars[0] is None or random.random() * seen < other.seen:  # noqa: S311
                self.exemplars[0] = other.exemplars[0]
            self.seen = seen


class _Instrument:
    """What a histogram and a counter share: the live interval, its lock, the limit."""

    _buckets = 0
    _bounds: tuple[float, ...] = ()
    kind = ""

    def __init__(self, hub: MetricsHub, name: str, unit: str, description: str) -> None:
        self._hub = hub
        self._name = name
        self._unit = unit
        self._description = description
        self._lock = threading.Lock()
        renew_after_fork(self)  # a lock held by another thread at a fork: a new one
        # The interval since the last collection: by the caller's attribute order (the hot
        # path's key) and by attribute set (what the points are made of).
        self._live: dict[Any, _Series] = {}
        self._sets: dict[frozenset[tuple[str, Any]], _Series] = {}
        self._known: set[frozenset[tuple[str, Any]]] = set()  # every set ever seen
        self._warned = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def unit(self) -> str:
        return self._unit

    @property
    def description(self) -> str:
        return self._description

    def _series(self, key: Any, attributes: Mapping[str, Any] | None) -> _Series:
        """The live series for a key not seen this interval (called with the lock held)."""
        frozen = _frozen(attributes)
        series = self._sets.get(frozen)
        if series is None:
            if frozen not in self._known:
                if len(self._known) >= self._hub.limit:
                    frozen = _OVERFLOW_KEY
                    attributes = _OVERFLOW
                    series = self._sets.get(frozen)
                if series is None:
                    self._known.add(frozen)
            if series is None:
                series = _Series(dict(attributes or {}), time.time_ns(), self._buckets)
                self._sets[frozen] = series
        if key is not None and len(self._live) < 4 * self._hub.limit:
            self._live[key] = series
        return series

    def _refuse(self, amount: object) -> None:
        if not self._warned:
            self._warned = True
            _logger.warning(
                "%s %r: a negative value (%r) is not recorded", self.kind, self._name, amount
            )

    def _exemplar(
        self, amount: float, attributes: Mapping[str, Any] | None, context: Context | None
    ) -> _Sample | None:
        """An exemplar for this measurement, if the provider's filter samples it."""
        hub = self._hub
        # The current span as the API's get_current_span() finds it, read from its context
        # variable directly (no abstract-class check: the library's own hot path).
        span = current_span() if context is None else _get_current_span(context)
        try:
            span_context = span.get_span_context()
        except AttributeError:  # not a span: the API would have returned the invalid one
            span, span_context = _INVALID_SPAN, _INVALID_SPAN.get_span_context()
        if CONTEXT_IS_TUPLE:  # the API's SpanContext is a tuple of these (checked at import)
            trace_id, span_id, _, flags, _, valid = span_context
        else:
            trace_id, span_id = span_context.trace_id, span_context.span_id
            flags, valid = span_context.trace_flags, span_context.is_valid
        if hub.exemplar_mode == _EXEMPLARS_TRACE:
            if span is _INVALID_SPAN or not flags & _SAMPLED:
                return None
        elif hub.exemplar_mode == _EXEMPLARS_CUSTOM and not hub.exemplar_filter.should_sample(
            amount, time.time_ns(), attributes, context
        ):
            return None
        if span is _INVALID_SPAN or not valid:
            return (amount, time.time_ns(), None, None, bool(attributes))
        return (amount, time.time_ns(), span_id, trace_id, bool(attributes))

    def _add(self, series: _Series, amount: float, sample: _Sample | None) -> None:
        """Add one measurement to ``series`` (called with the lock held)."""
        raise NotImplementedError

    def _measure(
        self,
        amount: float,
        attributes: Mapping[str, Any] | None = None,
        context: Context | None = None,
    ) -> None:
        """One measurement: ``record`` and ``add`` themselves (one call a point fewer)."""
        try:
            if amount < 0:
                self._refuse(amount)
                return
            key = tuple(attributes.items()) if attributes else ()
            sample = None
            if self._hub.exemplar_mode:
                sample = self._exemplar(amount, attributes, context)
            with self._lock:
                try:
                    series = self._live[key]
                except KeyError:
                    series = self._series(key, attributes)
                except TypeError:  # an unhashable attribute value (a list)
                    series = self._series(None, attributes)
                self._add(series, amount, sample)
        except Exception:  # telemetry never fails the caller
            return

    def swap(self) -> dict[frozenset[tuple[str, Any]], _Series]:
        """The interval so far, by attribute set; a new interval starts."""
        with self._lock:
            sets = self._sets
            if not sets:
                return {}  # never the live mapping: it fills again once the lock is free
            self._sets = {}
            self._live = {}
            return sets


class FastHistogram(_Instrument, metrics_api.Histogram):
    """A histogram of the library's own, aggregated in place (see the module docstring)."""

    kind = "histogram"
    _buckets = len(BOUNDARIES) + 1
    _bounds = BOUNDARIES

    record = _Instrument._measure

    def __init__(
        self,
        hub: MetricsHub,
        name: str,
        unit: str,
        description: str,
        boundaries: Sequence[float] | None = None,
    ) -> None:
        super().__init__(hub, name, unit, description)
        if boundaries is not None:  # the instrument's advice, as the SDK takes it
            self._bounds = tuple(float(b) for b in boundaries)
            self._buckets = len(self._bounds) + 1

    def _add(self, series: _Series, amount: float, sample: _Sample | None) -> None:
        index = bisect_left(self._bounds, amount)
        series.count += 1
        series.total += amount
        # Comparisons, not min()/max(): a builtin call with its argument parsing costs
        # more than the rest of this method (measured: 2,500 instructions a point).
        if amount < series.low:  # noqa: PLR1730
            series.low = amount
        if amount > series.high:  # noqa: PLR1730
            series.high = amount
        series.buckets[index] += 1
        if sample is not None:  # the last exemplar of each bucket
            series.exemplars[index] = sample


class FastCounter(_Instrument, metrics_api.Counter):
    """A counter of the library's own, aggregated in place (see the module docstring)."""

    kind = "counter"

    add = _Instrument._measure

    def _add(self, series: _Series, amount: float, sample: _Sample | None) -> None:
        series.count += 1
        series.total += amount
        if sample is not None:  # one exemplar, chosen uniformly (reservoir sampling)
            series.seen += 1
            if series.seen == 1 or random.random() * series.seen < 1:  # noqa: S311
                series.exemplars[0] = sample


def _add_up(
    into: dict[frozenset[tuple[str, Any]], _Series],
    later: dict[frozenset[tuple[str, Any]], _Series],
) -> None:
    """Add the series of ``later`` (a later interval) to those of ``into``, by attribute set."""
    for frozen, series in later.items():
        mine = into.get(frozen)
        if mine is None:
            into[frozen] = series.copy()
        else:
            mine.merge(series)


class _ReaderState:
    """One reader's view: its temporality, what it has not collected yet, its totals."""

    def __init__(self, histogram: AggregationTemporality, counter: AggregationTemporality) -> None:
        self.temporality = {"histogram": histogram, "counter": counter}
        self.pending: dict[_Instrument, dict[frozenset[tuple[str, Any]], _Series]] = {}
        self.totals: dict[_Instrument, dict[frozenset[tuple[str, Any]], _Series]] = {}
        self.last: int | None = None  # the previous collection's time


class MetricsHub:
    """The library's instruments on one meter provider, and the readers they feed.

    ``create_histogram`` / ``create_counter`` stand in for the SDK meter's (the runtime
    asks for each instrument once per configuration).
    """

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        exemplar_filter: object,
        limit: int,
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.limit = limit
        self.exemplar_filter: Any = None
        if isinstance(exemplar_filter, AlwaysOffExemplarFilter):
            self.exemplar_mode = _EXEMPLARS_OFF
        elif isinstance(exemplar_filter, AlwaysOnExemplarFilter):
            self.exemplar_mode = _EXEMPLARS_ON
        elif isinstance(exemplar_filter, TraceBasedExemplarFilter) or exemplar_filter is None:
            self.exemplar_mode = _EXEMPLARS_TRACE
        else:
            self.exemplar_mode = _EXEMPLARS_CUSTOM
            self.exemplar_filter = exemplar_filter
        self._lock = threading.Lock()
        renew_after_fork(self)  # a lock held by another thread at a fork: a new one
        self._instruments: dict[tuple[str, str], _Instrument] = {}
        self._readers: list[_ReaderState] = []

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> FastHistogram:
        found: FastHistogram = self._create(
            FastHistogram, name, unit, description, explicit_bucket_boundaries_advisory
        )
        return found

    def create_counter(self, name: str, unit: str = "", description: str = "") -> FastCounter:
        found: FastCounter = self._create(FastCounter, name, unit, description)
        return found

    def _create(
        self,
        cls: type[Any],
        name: str,
        unit: str,
        description: str,
        boundaries: Sequence[float] | None = None,
    ) -> Any:
        with self._lock:
            found = self._instruments.get((cls.kind, name))
            if found is None:
                made = (
                    cls(self, name, unit, description)
                    if boundaries is None
                    else cls(self, name, unit, description, boundaries)
                )
                found = self._instruments[(cls.kind, name)] = made
            return found

    # --- collection ---------------------------------------------------------------------

    def attach(self, reader: MetricReader, state: _ReaderState) -> None:
        """Add this hub's points to every collection of ``reader``."""
        original: Callable[..., MetricsData | None] = reader._collect  # type: ignore[assignment]

        def collect(
            metric_reader: MetricReader, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricsData | None:
            data = original(metric_reader, timeout_millis=timeout_millis, **kwargs)
            try:
                return self._add_points(data, self.collect(state))
            except Exception:  # a bug of ours loses our points, never the SDK's
                _logger.debug("rag_instrument metrics collection failed", exc_info=True)
                return data

        self._readers.append(state)
        reader._collect = collect  # type: ignore[assignment]

    def collect(self, state: _ReaderState) -> list[Metric]:
        """The metrics one reader collects now (its own temporality)."""
        with self._lock:
            now = time.time_ns()
            instruments = list(self._instruments.values())
            for instrument in instruments:
                interval = instrument.swap()
                if not interval:
                    continue
                for reader in self._readers:
                    _add_up(reader.pending.setdefault(instrument, {}), interval)
            previous, state.last = state.last, now
            metrics: list[Metric] = []
            for instrument in instruments:
                pending = state.pending.pop(instrument, {})
                temporality = state.temporality[instrument.kind]
                if temporality is AggregationTemporality.DELTA:
                    points = [
                        self._point(instrument, s, previous or s.start, now, s.exemplars)
                        for s in pending.values()
                    ]
                else:
                    totals = state.totals.setdefault(instrument, {})
                    _add_up(totals, pending)
                    points = [
                        self._point(
                            instrument,
                            total,
                            total.start,
                            now,
                            pending[frozen].exemplars if frozen in pending else [],
                        )
                        for frozen, total in totals.items()
                    ]
                if points:
                    metrics.append(self._metric(instrument, points, temporality))
            return metrics

    @staticmethod
    def _point(
        instrument: _Instrument,
        series: _Series,
        start: int,
        now: int,
        samples: Sequence[_Sample | None],
    ) -> Any:
        # Measurement attributes beyond the point's: none (the point has them all).
        chosen = [
            Exemplar({} if e[4] else None, e[0], e[1], e[2], e[3]) for e in samples if e is not None
        ]
        if instrument.kind == "histogram":
            return HistogramDataPoint(
                attributes=series.attributes,
                start_time_unix_nano=start,
                time_unix_nano=now,
                count=series.count,
                sum=series.total,
                bucket_counts=tuple(series.buckets),
                explicit_bounds=instrument._bounds,
                min=series.low,
                max=series.high,
                exemplars=chosen,
            )
        return NumberDataPoint(
            attributes=series.attributes,
            start_time_unix_nano=start,
            time_unix_nano=now,
            value=series.total,
            exemplars=chosen,
        )

    @staticmethod
    def _metric(
        instrument: _Instrument, points: list[Any], temporality: AggregationTemporality
    ) -> Metric:
        data: Histogram | Sum
        if instrument.kind == "histogram":
            data = Histogram(data_points=points, aggregation_temporality=temporality)
        else:
            data = Sum(data_points=points, aggregation_temporality=temporality, is_monotonic=True)
        return Metric(
            name=instrument.name,
            description=instrument.description,
            unit=instrument.unit,
            data=data,
        )

    def _add_points(self, data: MetricsData | None, metrics: list[Metric]) -> MetricsData | None:
        """``data`` (the SDK's collection) with ``metrics`` in this hub's scope."""
        if not metrics:
            return data
        scope_metrics: list[ScopeMetrics] = []
        resource_metrics: list[ResourceMetrics] = list(data.resource_metrics) if data else []
        if resource_metrics:
            first = resource_metrics[0]
            scope_metrics = list(first.scope_metrics)
        for i, found in enumerate(scope_metrics):
            if found.scope == self.scope:
                scope_metrics[i] = ScopeMetrics(
                    scope=found.scope,
                    metrics=[*found.metrics, *metrics],
                    schema_url=found.schema_url,
                )
                break
        else:
            scope_metrics.append(
                ScopeMetrics(
                    scope=self.scope,
                    metrics=metrics,
                    schema_url=self.scope.schema_url,  # type: ignore[arg-type]
                )
            )
        merged = ResourceMetrics(
            resource=resource_metrics[0].resource if resource_metrics else self.resource,
            scope_metrics=scope_metrics,
            schema_url=(
                resource_metrics[0].schema_url if resource_metrics else self.resource.schema_url
            ),
        )
        return MetricsData(resource_metrics=[merged, *resource_metrics[1:]])


def _reader_state(reader: MetricReader) -> tuple[_ReaderState, int] | None:
    """What the hub needs of ``reader``, or ``None`` when it must be left to the SDK."""
    try:  # the SDK's own instrument classes key a reader's preferences
        from opentelemetry.sdk.metrics._internal.instrument import _Counter, _Histogram
    except ImportError:
        return None

    temporality = getattr(reader, "_instrument_class_temporality", None)
    aggregation = getattr(reader, "_instrument_class_aggregation", None)
    limits = getattr(reader, "_instrument_class_cardinality_limit", None) or {}
    if not isinstance(temporality, dict) or not isinstance(aggregation, dict):
        return None
    if not callable(getattr(reader, "_collect", None)):
        return None
    histogram = aggregation.get(_Histogram)
    if type(histogram) is ExplicitBucketHistogramAggregation:
        if histogram._boundaries is not None or not histogram._record_min_max:
            return None
    elif type(histogram) is not DefaultAggregation:
        return None
    if type(aggregation.get(_Counter)) not in (DefaultAggregation, SumAggregation):
        return None
    kinds = (temporality.get(_Histogram), temporality.get(_Counter))
    if not all(isinstance(t, AggregationTemporality) for t in kinds):
        return None
    limit = min(
        (limits.get(_Histogram) or _DEFAULT_LIMIT), (limits.get(_Counter) or _DEFAULT_LIMIT)
    )
    return _ReaderState(kinds[0], kinds[1]), limit  # type: ignore[arg-type]


def build_hub(
    provider: MeterProvider,
    readers: Sequence[MetricReader],
    resource: Resource,
    name: str,
    version: str,
) -> MetricsHub | None:
    """A hub feeding ``readers`` of ``provider``, or ``None`` to use the SDK's instruments.

    Called right after the provider was built with these readers (and nothing recorded).
    """
    states: list[tuple[MetricReader, _ReaderState]] = []
    limit = _DEFAULT_LIMIT
    for reader in readers:
        try:
            found = _reader_state(reader)
        except Exception:  # laid out otherwise than we know: the SDK's instruments
            found = None
        if found is None:
            _logger.debug("rag_instrument metrics: %r needs the SDK's instruments", reader)
            return None
        states.append((reader, found[0]))
        limit = min(limit, found[1])
    config = getattr(provider, "_sdk_config", None)
    hub = MetricsHub(
        resource,
        InstrumentationScope(name, version, None, None),
        getattr(config, "exemplar_filter", None),
        limit,
    )
    for reader, state in states:
        hub.attach(reader, state)
    return hub
