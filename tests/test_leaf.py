"""Stage spans (``_leaf.StageSpan``): the SDK's guarantees without the SDK's span object.

Every guarantee is checked on the application's own SDK provider (its processors, its
sampler, its limits), and the spans the fast path makes are compared with the ones the
plain SDK path makes for the same code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

import rag_instrument as ri
from rag_instrument import _leaf, exporters
from rag_instrument._sanitize import REDACTED
from rag_instrument.exporters import StageSpan


class Recorder(SpanProcessor):
    """An application's processor that acts on start, on ending and on end."""

    def __init__(self) -> None:
        self.started: list[tuple[str, bool, Any]] = []
        self.ending: list[str] = []
        self.ended: list[ReadableSpan] = []

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self.started.append((span.name, span.is_recording(), span.get_span_context()))
        span.set_attribute("app.tenant", "t-1")

    def _on_ending(self, span: Span) -> None:
        self.ending.append(span.name)

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def _app(
    sampler: Sampler | None = None, processor: SpanProcessor | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    app = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(app))
    if processor is not None:
        provider.add_span_processor(processor)
    return provider, app


@pytest.fixture
def sdk_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make stage spans take the plain SDK path (the fallback)."""

    class NotTheSDK:
        pass

    monkeypatch.setattr(_leaf, "SDKTracer", NotTheSDK)
    _leaf._FACTS[0] = None
    yield
    _leaf._FACTS[0] = None


@pytest.fixture(autouse=True)
def _fresh_facts() -> Iterator[None]:
    _leaf._FACTS[0] = None
    yield
    _leaf._FACTS[0] = None


def test_the_current_span_inside_a_stage_is_a_recording_stage_span() -> None:
    provider, app = _app()
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval") as entered:
        current = trace.get_current_span()
        assert current is entered
        assert isinstance(current, StageSpan)
        assert current.is_recording()
        assert current.get_span_context().is_valid
        assert current.get_span_context().trace_flags.sampled
    assert not current.is_recording()
    assert trace.get_current_span() is trace.INVALID_SPAN
    (exported,) = app.get_finished_spans()
    assert exported.context == current.get_span_context()


def test_an_sdk_child_span_parents_to_the_stage_span() -> None:
    provider, app = _app()
    ri.configure(exporter="memory", tracer_provider=provider)
    other = provider.get_tracer("some.http.client")
    with ri.stage("retrieval") as stage_span:
        with other.start_as_current_span("GET") as child:
            assert isinstance(child, Span)
            grandchild = ri.stage("reranking")
            with grandchild as inner:
                pass
    spans = {s.name: s for s in app.get_finished_spans()}
    stage_ctx = stage_span.get_span_context()
    assert spans["GET"].parent is not None
    assert spans["GET"].parent.span_id == stage_ctx.span_id
    assert spans["GET"].context.trace_id == stage_ctx.trace_id
    assert spans["reranking"].parent is not None
    assert spans["reranking"].parent.span_id == child.get_span_context().span_id
    assert spans["reranking"].context == inner.get_span_context()
    assert spans["retrieval"].parent is None


def test_the_applications_processors_get_on_start_on_ending_and_on_end() -> None:
    recorder = Recorder()
    provider, _app_exporter = _app(processor=recorder)
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval") as span:
        pass
    ((name, recording, started_ctx),) = recorder.started
    assert (name, recording) == ("retrieval", True)
    assert started_ctx == span.get_span_context()
    assert recorder.ending == ["retrieval"]
    (ended,) = recorder.ended
    assert isinstance(ended, ReadableSpan)
    assert ended.end_time is not None
    assert ended.attributes is not None
    # What the processor set on start is on the span it and every exporter receive.
    assert ended.attributes["app.tenant"] == "t-1"
    assert ended.attributes["rag.stage"] == "retrieval"


def test_a_processor_added_later_is_called_too() -> None:
    provider, _app_exporter = _app()
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval"):
        pass
    recorder = Recorder()
    provider.add_span_processor(recorder)
    with ri.stage("retrieval"):
        pass
    assert [s[0] for s in recorder.started] == ["retrieval"]
    assert len(recorder.ended) == 1


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_the_configured_ratio_decides_root_stages(ratio: float) -> None:
    with ri.testing.capture(sample_ratio=ratio) as cap:
        for _ in range(20):
            with ri.stage("retrieval") as span:
                assert span.is_recording() is (ratio == 1.0)
                assert trace.get_current_span() is span
                assert span.get_span_context().is_valid
    assert len(cap.spans) == (20 if ratio == 1.0 else 0)


def test_a_ratio_sampler_keeps_the_same_traces_as_the_sdk() -> None:
    sampler = ParentBased(TraceIdRatioBased(0.5))
    provider, app = _app(sampler=sampler)
    ri.configure(exporter="memory", tracer_provider=provider)
    decisions = []
    for _ in range(200):
        with ri.stage("retrieval") as span:
            ctx = span.get_span_context()
            expected = sampler.should_sample(None, ctx.trace_id, "retrieval").decision
            decisions.append(expected.is_sampled())
            assert span.is_recording() is expected.is_recording()
            assert ctx.trace_flags.sampled is expected.is_sampled()
    assert len(app.get_finished_spans()) == sum(decisions)
    assert 0 < sum(decisions) < 200


def test_children_follow_the_parents_decision() -> None:
    provider, app = _app(sampler=ParentBased(ALWAYS_ON))
    ri.configure(exporter="memory", tracer_provider=provider)
    for sampled in (True, False):
        remote = SpanContext(
            0x1234,
            0x5678,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
        )
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
        try:
            with ri.stage("retrieval") as span:
                assert span.is_recording() is sampled
                assert span.get_span_context().trace_id == 0x1234
        finally:
            otel_context.detach(token)
    (exported,) = app.get_finished_spans()
    assert exported.parent is not None
    assert exported.parent.span_id == 0x5678
    assert exported.parent.is_remote


@settings(max_examples=60, deadline=None)
@given(
    flags=st.integers(min_value=0, max_value=255),
    remote=st.booleans(),
    state=st.lists(
        st.tuples(st.sampled_from(["a", "vendor", "k1"]), st.sampled_from(["1", "x-y"])),
        max_size=2,
        unique_by=lambda pair: pair[0],
    ),
    valid=st.booleans(),
    through_context=st.booleans(),
)
def test_the_parents_decision_flags_and_state_are_the_sdks(
    flags: int, remote: bool, state: list[tuple[str, str]], valid: bool, through_context: bool
) -> None:
    # The usual case (parent-based sampling, random ids) is decided in fewer steps: every
    # parent (sampled or not, remote or local, any flags and trace state, or none) still
    # gives the span the SDK would give.
    provider, _ = _app()
    tracer = provider.get_tracer("t")
    _leaf.start_stage_span(tracer, "warm-up", {}).end()  # the tracer's facts, found once
    parent = SpanContext(
        0xABC if valid else 0,
        0xDEF,
        is_remote=remote,
        trace_flags=TraceFlags(flags),
        trace_state=trace.TraceState(state),
    )
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    token = None if through_context else otel_context.attach(context)
    try:
        ours = _leaf.start_stage_span(
            tracer, "s", {"a": 1}, context=context if through_context else None
        )
        sdk = tracer.start_span("s", context=context, attributes={"a": 1})
    finally:
        if token is not None:
            otel_context.detach(token)
    assert isinstance(ours, StageSpan) is sdk.is_recording()
    assert ours.is_recording() is sdk.is_recording()
    mine, theirs = ours.get_span_context(), sdk.get_span_context()
    assert mine.trace_flags == theirs.trace_flags
    assert mine.trace_state == theirs.trace_state
    assert mine.is_valid
    assert not mine.is_remote
    if valid:
        assert mine.trace_id == theirs.trace_id == 0xABC
    if isinstance(ours, StageSpan):
        assert isinstance(sdk, Span)
        assert ours.parent == sdk.parent
        ours.end()
    sdk.end()


class KeepNamed(Sampler):
    """A custom sampler: keeps spans with one name and adds an attribute of its own."""

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Any] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if name != "retrieval":
            return SamplingResult(Decision.DROP)
        return SamplingResult(
            Decision.RECORD_AND_SAMPLE, {**(attributes or {}), "sampler.token": "sk-" + "a" * 24}
        )

    def get_description(self) -> str:
        return "KeepNamed"


def test_any_other_sampler_is_asked_and_its_attributes_are_redacted() -> None:
    provider, app = _app(sampler=KeepNamed())
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("reranking") as dropped:
        assert not dropped.is_recording()
    with ri.stage("retrieval"):
        pass
    assert [s.name for s in app.get_finished_spans()] == ["retrieval"]
    ours = ri.get_runtime().pipelines
    assert ours is not None
    assert ours.memory_exporter is not None
    (exported,) = ours.memory_exporter.get_finished_spans()
    assert exported.attributes is not None
    assert exported.attributes["sampler.token"] == REDACTED
    assert exported.attributes["rag.stage"] == "retrieval"


def test_span_limits_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "5")
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "1")
    provider, app = _app()
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval", top_k=5, index="documents") as span:
        span.add_event("first")
        span.add_event("second")
    (exported,) = app.get_finished_spans()
    attributes = dict(exported.attributes or {})
    assert len(attributes) == 3
    assert exported.dropped_attributes == 1  # the oldest, as the SDK evicts
    assert "rag.stage" not in attributes
    assert attributes["index"] == "docum"
    assert [e.name for e in exported.events] == ["second"]
    assert exported.dropped_events == 1


def test_attributes_set_from_outside_follow_the_sdks_rules() -> None:
    provider, app = _app()
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval") as span:
        span.set_attribute("kept", 1)
        span.set_attribute("ids", [1, 2])
        span.set_attribute("kept", 2)
    span.set_attribute("after.end", 3)  # ignored, as on an ended SDK span
    (exported,) = app.get_finished_spans()
    attributes = dict(exported.attributes or {})
    assert attributes["kept"] == 2
    assert list(attributes)[-1] == "kept"  # set again: moved last, as the SDK does
    assert attributes["ids"] == (1, 2)  # validated as the SDK does (a list becomes a tuple)
    assert "after.end" not in attributes


# --- redaction -----------------------------------------------------------------------------


def _exported(cap: ri.testing.Capture, name: str) -> ReadableSpan:
    return cap.span(name)


SECRET = "sk-" + "b" * 32


@pytest.mark.parametrize(
    "touch",
    [
        lambda s: s.set_attribute("api_key", SECRET),
        lambda s: s.set_attributes({"note": f"Bearer {SECRET}"}),
        lambda s: s.add_event("called", {"auth_token": SECRET}),
        lambda s: s.set_status(StatusCode.ERROR, f"failed with {SECRET}"),
        lambda s: s.record_exception(ValueError(f"key {SECRET}")),
    ],
    ids=["set_attribute", "set_attributes", "add_event", "set_status", "record_exception"],
)
def test_a_secret_set_from_outside_is_masked_at_export(touch: Any) -> None:
    with ri.testing.capture() as cap:
        with ri.stage("retrieval"):
            touch(trace.get_current_span())
        exported = _exported(cap, "retrieval")
    text = exported.to_json()
    assert SECRET not in text
    assert REDACTED in text


def test_a_secret_set_by_an_on_start_processor_is_masked_at_export() -> None:
    class Leaky(SpanProcessor):
        def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
            span.set_attribute("password", "hunter2")

    provider, _app_exporter = _app(processor=Leaky())
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval"):
        pass
    pipelines = ri.get_runtime().pipelines
    assert pipelines is not None
    assert pipelines.memory_exporter is not None
    (exported,) = pipelines.memory_exporter.get_finished_spans()
    assert exported.attributes is not None
    assert exported.attributes["password"] == REDACTED


def test_only_untouched_stage_spans_skip_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    redacted: list[str] = []
    real = exporters.redact_span

    def counting(span: ReadableSpan) -> ReadableSpan:
        redacted.append(span.name)
        return real(span)

    monkeypatch.setattr(exporters, "redact_span", counting)
    with ri.testing.capture():
        with ri.stage("untouched", top_k=3):
            pass
        with ri.stage("touched") as span:
            span.set_attribute("note", "anything")
        with ri.stage("failed"), pytest.raises(KeyError):
            raise KeyError("x")  # only the library's own (sanitised) event and status
    assert redacted == ["touched"]


# --- the fast path and the SDK path make the same spans ------------------------------------


def _run_scenario(provider: TracerProvider) -> None:
    ri.configure(exporter="memory", tracer_provider=provider, service_name="equivalence")
    with ri.request_context(request_id="r-1"):
        with ri.stage("retrieval", top_k=5) as span:
            span.set_attribute("app.docs", 3)
            span.add_event("fetched", {"rows": 3})
            with ri.stage("reranking"):
                pass

        @ri.stage("generation")
        def generate() -> None:
            raise ValueError("no model")

        with pytest.raises(ValueError):
            generate()

        @ri.stage("embedding")
        def embed() -> Iterator[int]:
            yield 1
            yield 2

        assert list(embed()) == [1, 2]
    ri.shutdown()


def _shape(span: ReadableSpan, ids: dict[int, int]) -> dict[str, Any]:
    def short(span_id: int | None) -> int | None:
        return None if span_id is None else ids.setdefault(span_id, len(ids))

    events = []
    for event in span.events:
        attributes = dict(event.attributes or {})
        attributes.pop("exception.stacktrace", None)  # line numbers of this file differ
        events.append((event.name, attributes))
    return {
        "name": span.name,
        "span": short(span.context.span_id if span.context else None),
        "parent": short(span.parent.span_id if span.parent else None),
        "flags": span.context.trace_flags if span.context else None,
        "attributes": dict(span.attributes or {}),
        "events": events,
        "status": (span.status.status_code, span.status.description),
        "kind": span.kind,
        "resource": dict(span.resource.attributes),
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
        "timed": span.start_time is not None
        and span.end_time is not None
        and span.start_time <= span.end_time,
    }


def _shapes(spans: Sequence[ReadableSpan]) -> list[dict[str, Any]]:
    ids: dict[int, int] = {}
    return [_shape(span, ids) for span in spans]


def _scenario_spans() -> list[ReadableSpan]:
    provider, app = _app()
    _run_scenario(provider)
    return list(app.get_finished_spans())


def test_the_sdk_path_makes_the_same_spans(request: pytest.FixtureRequest) -> None:
    fast = _scenario_spans()
    assert all(isinstance(s, StageSpan) for s in fast)
    request.getfixturevalue("sdk_path")
    plain = _scenario_spans()
    assert not any(isinstance(s, StageSpan) for s in plain)
    assert _shapes(fast) == _shapes(plain)
    assert [s.name for s in fast] == ["reranking", "retrieval", "generation", "embedding"]


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.booleans()),
        max_size=6,
    ),
    st.integers(min_value=0, max_value=4),
)
@example({"SIGNATURE": 0, "api_key": "k", "note": "token=abcdef123456"}, 4)
def test_set_attributes_match_the_sdk_span(values: dict[str, Any], limit: int) -> None:
    from opentelemetry.sdk.trace import SpanLimits

    results = []
    for fast in (True, False):
        provider = TracerProvider(span_limits=SpanLimits(max_span_attributes=limit + 2))
        app = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(app))
        tracer = provider.get_tracer("t")
        span = (
            _leaf.start_stage_span(tracer, "s", {"a": 1, "b": "x"})
            if fast
            else tracer.start_span("s", attributes={"a": 1, "b": "x"})
        )
        assert isinstance(span, StageSpan) is fast
        span.set_attributes(values)
        for key, value in values.items():
            span.set_attribute(key, value)
        span.end()
        (exported,) = app.get_finished_spans()
        attributes = dict(exported.attributes or {})
        if not fast:  # a stage span masks secrets as they are set; the SDK's span does not
            attributes = {k: _leaf._masked(k, v) for k, v in attributes.items()}
        results.append((attributes, exported.dropped_attributes))
        _leaf._FACTS[0] = None
    assert results[0][0] == results[1][0]
    assert list(results[0][0]) == list(results[1][0])


def test_a_stages_shared_description_is_never_changed_through_its_spans() -> None:
    staged = ri.stage("retrieval", top_k=5)
    with ri.testing.capture() as cap:
        with staged as first:
            first.set_attribute("only.first", 1)
        with staged:
            pass
        with staged as third:
            third.set_attribute("top_k", 6)
        with staged:
            pass
    attributes = [dict(s.attributes or {}) for s in cap.spans]
    assert [a.get("only.first") for a in attributes] == [1, None, None, None]
    assert [a["top_k"] for a in attributes] == [5, 5, 6, 5]


def test_a_tracer_that_starts_spans_its_own_way_keeps_its_way() -> None:
    from opentelemetry.sdk.trace import Tracer

    started: list[str] = []

    class VendorTracer(Tracer):
        def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
            started.append(name)
            return super().start_span(name, *args, **kwargs)

    class VendorProvider(TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            tracer = super().get_tracer(*args, **kwargs)
            tracer.__class__ = VendorTracer
            return tracer

    provider = VendorProvider()
    app = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(app))
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval") as span:
        assert not isinstance(span, StageSpan)
    assert started == ["retrieval"]
    assert [s.name for s in app.get_finished_spans()] == ["retrieval"]


_LIMITED_VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.text(max_size=30), max_size=3).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=8), _LIMITED_VALUES, max_size=6),
    st.dictionaries(st.text(min_size=1, max_size=8), _LIMITED_VALUES, max_size=4),
    st.integers(min_value=0, max_value=24),
)
def test_a_stage_span_keeps_to_the_length_limit_as_the_sdk_span(
    start: dict[str, Any], added: dict[str, Any], length: int
) -> None:
    # Start attributes and the library's own at the end, under any value length limit:
    # what is exported is what the SDK's span exports (each string cut to the limit).
    from opentelemetry.sdk.trace import SpanLimits

    results = []
    for fast in (True, False):
        provider = TracerProvider(span_limits=SpanLimits(max_attribute_length=length))
        app = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(app))
        tracer = provider.get_tracer("t")
        if fast:
            span = _leaf.start_stage_span(tracer, "s", dict(start))
            assert isinstance(span, StageSpan)
            span.finish(added)
        else:
            sdk_span = tracer.start_span("s", attributes=start)
            sdk_span.set_attributes(added)
            sdk_span.end()
        (exported,) = app.get_finished_spans()
        results.append(dict(exported.attributes or {}))
        _leaf._FACTS[0] = None
    assert results[0] == results[1]



def _cut(value: Any, length: int) -> Any:
    return value[:length] if isinstance(value, str) else tuple(v[:length] for v in value)


@pytest.mark.parametrize("length", [1, 5, 10, 40])
@pytest.mark.parametrize(
    "make", [lambda n: "x" * n, lambda n: ("k", "y" * n)], ids=["string", "tuple item"]
)
def test_a_value_one_past_the_length_limit_is_cut_on_a_stage_span(length: int, make: Any) -> None:
    # At the boundary: a value one character too long is cut, one of the limit's length
    # is kept whole (whatever the rest of the span holds).
    from opentelemetry.sdk.trace import SpanLimits

    provider = TracerProvider(span_limits=SpanLimits(max_attribute_length=length))
    app = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(app))
    tracer = provider.get_tracer("t")
    for name, value in (("long", make(length + 1)), ("whole", make(length))):
        span = _leaf.start_stage_span(tracer, name, {"a": value})
        assert isinstance(span, StageSpan)
        span.finish({"n": 1})
    _leaf._FACTS[0] = None
    long, whole = app.get_finished_spans()
    assert dict(long.attributes or {}) == {"a": _cut(make(length + 1), length), "n": 1}
    assert dict(whole.attributes or {}) == {"a": make(length), "n": 1}
