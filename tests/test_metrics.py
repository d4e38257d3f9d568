"""The library's own histograms and counters (``rag_instrument._metrics``).

They aggregate in place instead of through the SDK's per-measurement path; what a reader
collects must be what the SDK itself would have produced for the same measurements.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricsData,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

import rag_instrument as ri
from rag_instrument import _metrics, testing

DELTA = {Histogram: AggregationTemporality.DELTA, Counter: AggregationTemporality.DELTA}


def _readers(limit: int | None = None) -> list[InMemoryMetricReader]:
    limits = {Histogram: limit, Counter: limit} if limit else None
    return [
        InMemoryMetricReader(cardinality_limits=limits),
        InMemoryMetricReader(preferred_temporality=DELTA, cardinality_limits=limits),
    ]


ADVISED = (0.01, 0.5, 1, 7.5, 100.0, 5000)


class Pair:
    """The same measurements through the hub and through the SDK's own instruments."""

    def __init__(self, *, limit: int | None = None, exemplar_filter: Any = None) -> None:
        flt = exemplar_filter or AlwaysOffExemplarFilter()
        self.ours_readers = _readers(limit)
        self.sdk_readers = _readers(limit)
        resource = Resource.create({"service.name": "t"})
        ours = MeterProvider(
            metric_readers=self.ours_readers,
            resource=resource,
            exemplar_filter=flt,
            shutdown_on_exit=False,
        )
        hub = _metrics.build_hub(ours, self.ours_readers, resource, "rag_instrument", "1")
        assert hub is not None
        self.hub = hub
        sdk = MeterProvider(
            metric_readers=self.sdk_readers,
            resource=resource,
            exemplar_filter=flt,
            shutdown_on_exit=False,
        )
        self.meter = sdk.get_meter("rag_instrument", "1")
        self.ours: dict[tuple[str, str], Any] = {}
        self.sdk: dict[tuple[str, str], Any] = {}

    def instrument(self, kind: str, name: str) -> tuple[Any, Any]:
        key = (kind, name)
        if key not in self.ours:
            advice: dict[str, Any] = {}
            if kind == "histogram" and name.endswith(".advised"):  # the instrument's buckets
                advice["explicit_bucket_boundaries_advisory"] = ADVISED
            self.ours[key] = getattr(self.hub, f"create_{kind}")(name, "s", "d", **advice)
            self.sdk[key] = getattr(self.meter, f"create_{kind}")(
                name, unit="s", description="d", **advice
            )
        return self.ours[key], self.sdk[key]

    def measure(self, kind: str, name: str, value: float, attributes: dict[str, Any]) -> None:
        ours, sdk = self.instrument(kind, name)
        method = "record" if kind == "histogram" else "add"
        getattr(ours, method)(value, attributes)
        getattr(sdk, method)(value, attributes)

    def collect(self, index: int) -> tuple[Any, Any]:
        return (
            _summary(self.ours_readers[index].get_metrics_data()),
            _summary(self.sdk_readers[index].get_metrics_data()),
        )


class Close(float):
    """A sum: equal to one within rounding (intervals may be added in another grouping)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float | int) and math.isclose(self, other, rel_tol=1e-12)

    __hash__ = float.__hash__


def _summary(data: MetricsData | None) -> dict[str, Any]:
    """What a collection says, without timestamps, in an order-free form."""
    out: dict[str, Any] = {}
    if data is None:
        return out
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "rag_instrument"
            for metric in scope_metrics.metrics:
                points = {}
                for p in metric.data.data_points:
                    key = frozenset(p.attributes.items())
                    if hasattr(p, "bucket_counts"):
                        points[key] = (
                            p.count,
                            Close(p.sum),
                            tuple(p.bucket_counts),
                            tuple(p.explicit_bounds),
                            p.min,
                            p.max,
                        )
                    else:
                        points[key] = p.value
                out[metric.name] = (
                    metric.unit,
                    metric.description,
                    metric.data.aggregation_temporality,
                    getattr(metric.data, "is_monotonic", None),
                    points,
                )
    return out


ATTRIBUTE_SETS = [
    {},
    {"rag.stage": "retrieval"},
    {"rag.stage": "generation", "gen_ai.request.model": "m"},
    {"gen_ai.request.model": "m", "rag.stage": "generation"},  # the same set, other order
    {"db.operation.name": "SELECT", "n": 3, "ok": True},
]

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("measure"),
            st.sampled_from(["histogram", "counter"]),
            st.sampled_from(["a", "b", "advised"]),
            st.one_of(
                st.integers(min_value=0, max_value=20_000),
                st.floats(min_value=0, max_value=20_000, allow_nan=False),
                st.sampled_from([0.0, 5.0, 10.0, 7500.0, 10000.0, 10000.5]),
            ),
            st.integers(min_value=0, max_value=len(ATTRIBUTE_SETS) - 1),
        ),
        st.tuples(st.just("collect"), st.integers(min_value=0, max_value=1)),
    ),
    max_size=60,
)


@settings(max_examples=150)
@given(operations)
def test_readers_collect_what_the_sdk_would_both_temporalities(ops: list[tuple[Any, ...]]) -> None:
    pair = Pair()
    for op in ops:
        if op[0] == "measure":
            _, kind, name, value, which = op
            if kind == "counter":
                value = int(value)  # the SDK sums ints as ints: keep sums exact
            pair.measure(kind, f"{kind}.{name}", value, dict(ATTRIBUTE_SETS[which]))
        else:
            ours, sdk = pair.collect(op[1])
            assert ours == sdk
    for index in (0, 1):
        ours, sdk = pair.collect(index)
        assert ours == sdk


def test_cardinality_limit_sends_further_attribute_sets_to_the_overflow_point() -> None:
    pair = Pair(limit=3)
    for i in range(6):
        for _ in range(i + 1):
            pair.measure("histogram", "h", 1.0, {"k": i})
            pair.measure("counter", "c", 2, {"k": i})
    ours, sdk = pair.collect(0)
    assert ours == sdk
    points = ours["h"][4]
    assert points[frozenset({("otel.metric.overflow", True)})][0] == 4 + 5 + 6
    assert len(points) == 4
    ours_delta, sdk_delta = pair.collect(1)
    assert ours_delta == sdk_delta


def test_negative_values_are_dropped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    pair = Pair()
    with caplog.at_level(logging.WARNING, logger="rag_instrument"):
        for _ in range(3):
            pair.measure("histogram", "h", -1.0, {})
            pair.measure("counter", "c", -2, {})
        pair.measure("histogram", "h", 1.0, {})
    ours, sdk = pair.collect(0)
    assert ours == sdk
    assert ours["h"][4][frozenset()][0] == 1
    mine = [r for r in caplog.records if r.name == "rag_instrument"]
    assert len(mine) == 2  # one per instrument, not one per measurement


def test_bad_attributes_or_values_never_raise_and_lists_are_attribute_values() -> None:
    pair = Pair()
    h = pair.hub.create_histogram("h")
    h.record(1.0, {"tags": ["a", "b"]})
    h.record(2.0, {"tags": ["a", "b"]})
    h.record("not a number", {})  # type: ignore[arg-type]
    h.record(None, {"x": object()})  # type: ignore[arg-type]
    c = pair.hub.create_counter("c")
    c.add("many", {})  # type: ignore[arg-type]
    data = pair.ours_readers[0].get_metrics_data()
    assert data is not None
    (metric,) = [m for m in data.resource_metrics[0].scope_metrics[0].metrics if m.name == "h"]
    (point,) = metric.data.data_points
    assert point.count == 2
    assert point.attributes == {"tags": ["a", "b"]}


def test_timestamps_cumulative_from_the_first_measurement_delta_from_the_last_collection() -> None:
    pair = Pair()
    h = pair.hub.create_histogram("h")
    h.record(1.0, {})
    first_cumulative = pair.ours_readers[0].get_metrics_data()
    first_delta = pair.ours_readers[1].get_metrics_data()
    h.record(2.0, {})
    second_cumulative = pair.ours_readers[0].get_metrics_data()
    second_delta = pair.ours_readers[1].get_metrics_data()

    def point(data: MetricsData | None) -> Any:
        assert data is not None
        return data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0]

    c1, c2 = point(first_cumulative), point(second_cumulative)
    d1, d2 = point(first_delta), point(second_delta)
    assert c1.start_time_unix_nano == c2.start_time_unix_nano <= c1.time_unix_nano
    assert (c1.count, c2.count) == (1, 2)
    assert d1.start_time_unix_nano == c1.start_time_unix_nano
    assert d2.start_time_unix_nano == d1.time_unix_nano < d2.time_unix_nano
    assert (d1.count, d2.count) == (1, 1)
    # Nothing new: the delta reader has no point, the cumulative one repeats its total.
    assert pair.ours_readers[1].get_metrics_data() is None
    assert point(pair.ours_readers[0].get_metrics_data()).count == 2


def _exemplars(data: MetricsData | None, name: str) -> list[Any]:
    assert data is not None
    found = []
    for scope_metrics in data.resource_metrics[0].scope_metrics:
        for metric in scope_metrics.metrics:
            if metric.name == name:
                for p in metric.data.data_points:
                    found.extend(p.exemplars)
    return found


@pytest.mark.parametrize("kind", ["histogram", "counter"])
def test_trace_based_exemplars_match_the_sdk(kind: str) -> None:
    pair = Pair(exemplar_filter=TraceBasedExemplarFilter())
    tracer = TracerProvider().get_tracer("t")
    pair.measure(kind, "x", 3, {"a": 1})  # no span: no exemplar
    with tracer.start_as_current_span("sampled") as span:
        pair.measure(kind, "x", 4, {"a": 1})
        pair.measure(kind, "x", 3, {"a": 1})  # the same bucket: the later one is kept
        pair.measure(kind, "x", 30, {"a": 1})
    ctx = span.get_span_context()
    for index in (0, 1):
        ours = _exemplars(pair.ours_readers[index].get_metrics_data(), "x")
        sdk = _exemplars(pair.sdk_readers[index].get_metrics_data(), "x")
        if kind == "histogram":
            assert sorted(e.value for e in ours) == sorted(e.value for e in sdk) == [3, 30]
        else:
            assert len(ours) == len(sdk) == 1
            assert ours[0].value in (4, 3, 30)
        for e in ours:
            assert (e.span_id, e.trace_id) == (ctx.span_id, ctx.trace_id)
            assert e.filtered_attributes == {}
    # Exemplars belong to one collection.
    pair.measure(kind, "x", 1, {"a": 1})
    assert _exemplars(pair.ours_readers[0].get_metrics_data(), "x") == []


def test_trace_based_exemplars_unsampled_spans_odd_contexts_and_explicit_contexts() -> None:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as trace_api
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    pair = Pair(exemplar_filter=TraceBasedExemplarFilter())
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("t").start_as_current_span("dropped"):
        pair.measure("histogram", "unsampled", 3, {})
    # Something that is not a span under the API's key: the API reads it as no span; the
    # measurement is recorded all the same.
    token = otel_context.attach(otel_context.set_value(trace_api._SPAN_KEY, object()))
    try:
        pair.measure("histogram", "odd", 3, {})
    finally:
        otel_context.detach(token)
    # An explicit context decides, not the current one.
    with TracerProvider().get_tracer("t").start_as_current_span("given") as given:
        explicit = otel_context.get_current()
    ours, sdk = pair.instrument("histogram", "explicit")
    ours.record(5, {}, context=explicit)
    sdk.record(5, {}, context=explicit)
    for index in (0, 1):
        ours_data = pair.ours_readers[index].get_metrics_data()
        sdk_data = pair.sdk_readers[index].get_metrics_data()
        assert _summary(ours_data) == _summary(sdk_data)
        for name in ("unsampled", "odd"):
            assert _exemplars(ours_data, name) == _exemplars(sdk_data, name) == []
        (exemplar,) = _exemplars(ours_data, "explicit")
        ctx = given.get_span_context()
        assert (exemplar.span_id, exemplar.trace_id) == (ctx.span_id, ctx.trace_id)


def test_always_on_exemplars_without_a_span_and_always_off() -> None:
    on = Pair(exemplar_filter=AlwaysOnExemplarFilter())
    on.measure("histogram", "x", 3, {})
    (exemplar,) = _exemplars(on.ours_readers[0].get_metrics_data(), "x")
    assert (exemplar.value, exemplar.span_id, exemplar.filtered_attributes) == (3, None, None)
    off = Pair(exemplar_filter=AlwaysOffExemplarFilter())
    with TracerProvider().get_tracer("t").start_as_current_span("s"):
        off.measure("histogram", "x", 3, {})
    assert _exemplars(off.ours_readers[0].get_metrics_data(), "x") == []


def test_concurrent_recording_and_collection_lose_nothing() -> None:
    pair = Pair()
    h = pair.hub.create_histogram("h")
    c = pair.hub.create_counter("c")
    start = threading.Barrier(5)

    def work(n: int) -> None:
        start.wait()
        for i in range(2000):
            h.record(float(i % 7), {"t": n % 2})
            c.add(1, {"t": n % 2})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        for t in threads:
            t.start()
        start.wait()
        deltas = []
        while any(t.is_alive() for t in threads):
            deltas.append(_summary(pair.ours_readers[1].get_metrics_data()))
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    deltas.append(_summary(pair.ours_readers[1].get_metrics_data()))
    total = pair.collect(0)[0]
    assert sum(p[0] for p in total["h"][4].values()) == 8000
    assert sum(total["c"][4].values()) == 8000
    delta_count = sum(p[0] for d in deltas if "h" in d for p in d["h"][4].values())
    assert delta_count == 8000


def test_configure_uses_the_hub_and_metrics_reach_the_memory_reader() -> None:
    with testing.capture() as cap:
        assert isinstance(ri.get_runtime().stage_duration, _metrics.FastHistogram)

        @ri.stage("retrieval")
        def retrieve() -> int:
            return 1

        retrieve()
        retrieve()
        points = cap.metrics()
    (point,) = points["rag.stage.duration"]
    assert point.count == 2
    assert point.attributes == {"rag.stage": "retrieval"}
    assert "rag.spans.dropped" in points  # the SDK's observable, in the same collection


def test_a_reader_preferring_exponential_histograms_gets_the_sdks_instruments() -> None:
    reader = InMemoryMetricReader(
        preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation()}
    )
    try:
        ri.configure(exporter="memory", metric_readers=[reader], logs_exporter="none")
        assert not isinstance(ri.get_runtime().stage_duration, _metrics.FastHistogram)

        @ri.stage("retrieval")
        def retrieve() -> int:
            return 1

        retrieve()
        data = reader.get_metrics_data()
        assert data is not None
        names = {
            type(m.data).__name__: m.name
            for sm in data.resource_metrics[0].scope_metrics
            for m in sm.metrics
        }
        assert names.get("ExponentialHistogram") == "rag.stage.duration"
    finally:
        ri.shutdown()


def test_a_users_meter_provider_gets_the_sdks_instruments() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        ri.configure(exporter="memory", meter_provider=provider, logs_exporter="none")
        assert not isinstance(ri.get_runtime().stage_duration, _metrics.FastHistogram)
    finally:
        ri.shutdown()
        provider.shutdown()


def test_a_delta_reader_beside_the_default_one_gets_delta_points() -> None:
    reader = InMemoryMetricReader(preferred_temporality=DELTA)
    try:
        ri.configure(exporter="memory", metric_readers=[reader], logs_exporter="none")
        assert isinstance(ri.get_runtime().stage_duration, _metrics.FastHistogram)

        @ri.stage("retrieval")
        def retrieve() -> int:
            return 1

        retrieve()
        first = _summary(reader.get_metrics_data())
        retrieve()
        retrieve()
        second = _summary(reader.get_metrics_data())
        assert first["rag.stage.duration"][2] is AggregationTemporality.DELTA
        ((count, *_),) = first["rag.stage.duration"][4].values()
        ((count2, *_),) = second["rag.stage.duration"][4].values()
        assert (count, count2) == (1, 2)
    finally:
        ri.shutdown()


def test_a_reader_without_the_private_preferences_is_left_to_the_sdk() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    del reader._instrument_class_aggregation
    assert _metrics.build_hub(provider, [reader], Resource.create({}), "x", "1") is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_records_although_a_lock_was_held_at_the_fork() -> None:
    pair = Pair()
    h = pair.hub.create_histogram("h")
    h.record(1.0, {})
    h._lock.acquire()  # another thread is recording at the moment of the fork
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child: record, collect, report through the exit status
            try:
                h.record(2.0, {})
                data = pair.ours_readers[1].get_metrics_data()
                (point,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
                os._exit(0 if point.count == 2 else 1)
            except BaseException:
                os._exit(2)
    finally:
        h._lock.release()
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child hung on the lock held at the fork")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    ("variable", "value", "fast"),
    [
        (
            "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
            "base2_exponential_bucket_histogram",
            False,
        ),
        ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta", True),
    ],
)
def test_the_otlp_exporters_environment_decides_like_the_sdk(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fast: bool
) -> None:
    monkeypatch.setenv(variable, value)
    try:
        ri.configure(exporter="otlp", otlp_endpoint="http://127.0.0.1:9", logs_exporter="none")
        histogram = ri.get_runtime().stage_duration
        assert isinstance(histogram, _metrics.FastHistogram) is fast
    finally:
        ri.shutdown(timeout=1.0)


def test_a_collection_with_nothing_recorded_takes_nothing_recorded_after_it() -> None:
    # The collector swaps the interval out, then reads it without the lock: an empty
    # interval must not be the live mapping, or measurements recorded meanwhile would be
    # handed to the readers while still live, and counted again at the next collection.
    pair = Pair()
    h = pair.hub.create_histogram("h")
    interval = h.swap()
    h.record(1.0, {})
    assert interval == {}
    first = _summary(pair.ours_readers[1].get_metrics_data())  # delta
    assert first["h"][4][frozenset()][0] == 1
    assert pair.ours_readers[1].get_metrics_data() is None  # counted once


def test_a_reader_with_preferences_laid_out_otherwise_is_left_to_the_sdk() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    reader._instrument_class_cardinality_limit = ["not", "a", "mapping"]  # type: ignore[assignment]
    assert _metrics.build_hub(provider, [reader], Resource.create({}), "x", "1") is None


def test_histograms_use_the_semantic_conventions_buckets() -> None:
    # Seconds in the SDK's default buckets (0, 5, 10 ... 10000) would put every call under
    # 5 s in one bucket: each histogram uses the boundaries its convention advises.
    class Model(ri.LLMProvider):
        system, model = "acme", "m"

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            return ri.LLMResult("a", input_tokens=300, output_tokens=20)

    with testing.capture() as cap:
        with ri.stage("generation"):
            asyncio.run(Model().generate("q"))
        points = cap.metrics()
    (duration,) = points["gen_ai.client.operation.duration"]
    assert tuple(duration.explicit_bounds)[:3] == (0.01, 0.02, 0.04)
    assert duration.bucket_counts[0] == 1  # a call of well under 10 ms: the first bucket
    tokens = points["gen_ai.client.token.usage"]
    assert {tuple(p.explicit_bounds)[:4] for p in tokens} == {(1, 4, 16, 64)}
    (stage,) = points["rag.stage.duration"]
    assert tuple(stage.explicit_bounds)[:2] == (0.005, 0.01)
    assert tuple(stage.explicit_bounds) == ri.attributes.HISTOGRAM_BOUNDARIES["rag.stage.duration"]


def test_an_applications_meter_provider_gets_the_same_advice() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    ri.configure(exporter="memory", meter_provider=provider)

    @ri.stage("retrieval")
    def retrieve() -> int:
        return 1

    retrieve()
    data = reader.get_metrics_data()
    assert data is not None
    bounds = {
        metric.name: tuple(metric.data.data_points[0].explicit_bounds)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "rag.stage.duration"
    }
    assert bounds == {"rag.stage.duration": ri.attributes.HISTOGRAM_BOUNDARIES["rag.stage.duration"]}
