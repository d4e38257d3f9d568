"""Exporter plumbing: leaf spans for statements."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import rag_instrument as ri
from rag_instrument import _runtime
from rag_instrument.exporters import LeafSpan, start_leaf_span
from rag_instrument.testing import Capture, capture


def test_leaf_span_under_a_stage_is_a_full_child(rag_capture: Capture) -> None:
    tracer = _runtime.get_runtime().tracer
    with ri.stage("retrieval") as parent:
        span = start_leaf_span(tracer, "SELECT docs", SpanKind.CLIENT, {"db.system.name": "sqlite"})
        assert isinstance(span, LeafSpan)
        span.set_attribute("db.operation.name", "SELECT")
        span.set_status(StatusCode.ERROR, "boom")
        span.end()
        span.end()  # once only
    leaf = rag_capture.span("SELECT docs")
    assert leaf.parent is not None
    assert leaf.parent.span_id == parent.get_span_context().span_id
    assert leaf.context.trace_id == parent.get_span_context().trace_id
    assert leaf.kind is SpanKind.CLIENT
    assert dict(leaf.attributes or {}) == {
        "db.system.name": "sqlite",
        "db.operation.name": "SELECT",
    }
    assert leaf.status.status_code is StatusCode.ERROR
    assert leaf.resource.attributes["service.name"] == "rag-service"
    assert leaf.instrumentation_scope is not None
    assert leaf.instrumentation_scope.name == "rag_instrument"
    assert leaf.start_time is not None
    assert leaf.end_time is not None
    assert leaf.start_time <= leaf.end_time


def test_leaf_span_shared_attributes_are_not_mutated() -> None:
    shared = {"db.system.name": "sqlite"}
    with capture(), ri.stage("retrieval"):
        span = start_leaf_span(_runtime.get_runtime().tracer, "q", SpanKind.CLIENT, shared)
        span.set_attribute("extra", 1)
        span.end()
    assert shared == {"db.system.name": "sqlite"}


def test_unsampled_parent_gives_a_non_recording_span() -> None:
    with capture(sample_ratio=0.0) as cap, ri.stage("retrieval"):
        span = start_leaf_span(_runtime.get_runtime().tracer, "q", SpanKind.CLIENT, {})
        assert not span.is_recording()
        span.end()
    assert cap.spans == []


def test_without_a_parent_it_is_an_ordinary_span(rag_capture: Capture) -> None:
    span = start_leaf_span(_runtime.get_runtime().tracer, "root q", SpanKind.CLIENT, {})
    assert not isinstance(span, LeafSpan)
    span.end()
    assert rag_capture.span("root q").parent is None


def test_the_applications_processors_receive_leaf_spans() -> None:
    app = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(app))
    ri.configure(exporter="memory", tracer_provider=provider)
    tracer = _runtime.get_runtime().tracer
    with ri.stage("retrieval"):
        start_leaf_span(tracer, "q", SpanKind.CLIENT, {}).end()
    assert [s.name for s in app.get_finished_spans()] == ["q", "retrieval"]
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_secrets_in_any_span_are_masked_before_export(rag_capture: Capture) -> None:
    tracer = trace.get_tracer("some.other.instrumentation")
    with tracer.start_as_current_span("GET") as span:
        span.set_attribute(
            "url.full", "https://user:hunter2@api.example.com/v1?api_key=abc123secret"
        )
        span.set_attribute("http.request.header.authorization", ("Bearer abcdef123456",))
        span.set_attribute("api_key", "k-123")
        span.set_attribute("gen_ai.usage.input_tokens", 12)
        span.add_event("retry", {"note": "sent Authorization: Bearer abcdef123456"})
        span.set_status(StatusCode.ERROR, "rejected sk-abcdefghijklmnop1234")
    exported = rag_capture.span("GET")
    text = repr(dict(exported.attributes or {})) + repr(exported.events[0].attributes)
    text += repr(exported.status.description)
    for secret in ("hunter2", "abc123secret", "abcdef123456", "k-123", "sk-abcdefghijklmnop1234"):
        assert secret not in text
    assert exported.attributes is not None
    assert exported.attributes["gen_ai.usage.input_tokens"] == 12
    assert exported.attributes["url.full"].startswith("https://user:[REDACTED]@api.example.com")


def test_spans_without_secrets_are_exported_as_they_are() -> None:
    from rag_instrument.exporters import redact_span

    with capture() as cap, ri.stage("retrieval"):
        pass
    span = cap.span("retrieval")
    assert redact_span(span) is span


def test_redaction_of_spans_can_be_turned_off() -> None:
    with capture(redact=False) as cap:
        with trace.get_tracer("x").start_as_current_span("raw") as span:
            span.set_attribute("api_key", "k-123")
    assert (cap.span("raw").attributes or {})["api_key"] == "k-123"


def test_attributes_added_to_a_stage_span_by_hand_are_still_masked(rag_capture: Capture) -> None:
    with ri.stage("retrieval") as span:
        span.set_attribute("api_key", "k-123")
    with ri.stage("generation"):
        pass
    assert (rag_capture.span("retrieval").attributes or {})["api_key"] == "[REDACTED]"
    assert (rag_capture.span("generation").attributes or {})["rag.stage"] == "generation"


def test_numbers_under_secret_names_set_by_hand_are_masked(rag_capture: Capture) -> None:
    from opentelemetry import trace

    with ri.stage("login"):
        trace.get_current_span().set_attribute("password", 48151623)
    with trace.get_tracer("app").start_as_current_span("raw") as raw:
        raw.set_attribute("client_secret", 987654321.5)
        raw.set_attribute("gen_ai.usage.input_tokens", 12)  # not a secret: kept
    assert (rag_capture.span("login").attributes or {})["password"] == "[REDACTED]"
    attributes = rag_capture.span("raw").attributes or {}
    assert attributes["client_secret"] == "[REDACTED]"
    assert attributes["gen_ai.usage.input_tokens"] == 12


# --- the batch processor's queue ---------------------------------------------------------------


def test_a_full_batch_wakes_the_export_thread_before_its_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Spans are queued without the SDK's emit() (a system call per span); a queue holding a
    # whole batch must still wake the export thread, long before the hour-long delay.
    import threading

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    exported: list[str] = []
    arrived = threading.Event()

    class Collect(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            exported.extend(span.name for span in spans)
            if len(exported) >= 8:
                arrived.set()
            return SpanExportResult.SUCCESS

    ri.configure(exporter=Collect(), metrics_exporter="none")
    try:
        for n in range(8):
            with ri.stage(f"s{n}"):
                pass
        assert arrived.wait(30), exported  # no flush: only the wake-up can send them
        assert sorted(exported) == [f"s{n}" for n in range(8)]
    finally:
        ri.shutdown()


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _sdk_batch_processor() -> Any:
    """Configure with a dropping exporter; the SDK batch processor inside ours."""
    ri.configure(exporter=_Drop(), metrics_exporter="none")
    pipelines = ri.get_runtime().pipelines
    assert pipelines is not None
    processor: Any = next(p for p in pipelines.processors if hasattr(p, "_batch_processor"))
    return processor._batch_processor


def test_only_sampled_spans_are_queued_for_export() -> None:
    # A span handed to the processor with its sampled flag off is not exported, as the
    # SDK's batch processor does; with the flag on (and the random-id bit) it is.
    from opentelemetry.sdk.trace import ReadableSpan as SDKReadableSpan

    exported: list[str] = []

    class Collect(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            exported.extend(span.name for span in spans)
            return SpanExportResult.SUCCESS

    ri.configure(exporter=Collect(), metrics_exporter="none")
    pipelines = ri.get_runtime().pipelines
    assert pipelines is not None
    processor: Any = next(p for p in pipelines.processors if hasattr(p, "_batch_processor"))
    for name, flags in (("dropped", 0), ("kept", 1), ("random only", 2), ("kept too", 3)):
        context = trace.SpanContext(7, 9, is_remote=False, trace_flags=trace.TraceFlags(flags))
        processor.on_end(SDKReadableSpan(name=name, context=context))
    processor.on_end(SDKReadableSpan(name="no context"))
    ri.force_flush()
    ri.shutdown()
    assert sorted(exported) == ["kept", "kept too"]


def test_spans_after_shutdown_are_refused_the_sdks_way(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    _sdk_batch_processor().shutdown()
    with caplog.at_level(logging.INFO):
        with ri.stage("late"):
            pass
    assert any("Shutdown called" in r.getMessage() for r in caplog.records)
    ri.shutdown()


def test_an_sdk_whose_emit_does_more_keeps_its_emit(monkeypatch: pytest.MonkeyPatch) -> None:
    from rag_instrument import exporters

    inner = _sdk_batch_processor()
    assert exporters._emits_inline(inner)
    original = type(inner).emit

    def emit(self: Any, data: Any) -> None:  # a later SDK: a metric per queued item
        self._metrics.queued_items(1)
        original(self, data)

    monkeypatch.setattr(type(inner), "emit", emit)
    assert not exporters._emits_inline(inner)
    ri.shutdown()


def test_an_exporter_raising_systemexit_loses_that_batch_only(tmp_path: Path) -> None:
    # SystemExit ended the SDK's export thread silently: every later span was lost, and
    # shutdown() still said everything was exported.
    class ExitsOnce(SpanExporter):
        calls = 0
        exported = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            ExitsOnce.calls += 1
            if ExitsOnce.calls == 1:
                raise SystemExit(1)
            ExitsOnce.exported += len(spans)
            return SpanExportResult.SUCCESS

    log = tmp_path / "app.jsonl"
    ri.configure(exporter=ExitsOnce(), log_file=str(log))
    with ri.stage("lost"):
        pass
    assert ri.force_flush() is False  # that batch is lost; the application goes on
    for _ in range(3):
        with ri.stage("kept"):
            pass
    assert ri.force_flush() is True
    assert ExitsOnce.exported == 3
    assert ri.shutdown() is False  # one span was lost in this configuration's life
    assert "ExitsOnce.export failed: SystemExit" in log.read_text()


def test_nothing_is_traced_under_suppress_instrumentation() -> None:
    # The SDK's batch processor exports under suppress_instrumentation(): an exporter that
    # writes through instrumented code must make no spans of its own, or each export makes
    # spans to export, forever.
    import sqlalchemy as sa
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    # NullPool: every connection closed when released, whatever thread made it.
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.NullPool)
    ri.instrument_sqlalchemy(engine)

    @ri.traced("op")
    def op() -> int:
        return 1

    try:
        with capture() as cap:
            with suppress_instrumentation():
                with ri.stage("retrieval"), engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                    assert op() == 1
            assert not cap.spans
            assert cap.find_logs("retrieval completed")  # lines are not exported: kept
            with ri.stage("retrieval"), engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            assert sorted(s.name for s in cap.spans) == ["SELECT", "retrieval"]
    finally:
        ri.db.uninstrument_sqlalchemy(engine)
        engine.dispose()  # Python 3.13 warns of an unclosed sqlite3 connection otherwise


class _WritesThroughAnInstrumentedEngine(SpanExporter):
    def __init__(self) -> None:
        import sqlalchemy as sa

        # NullPool: the export and flush threads' connections are closed when released.
        self.engine = sa.create_engine("sqlite://", poolclass=sa.pool.NullPool)
        ri.instrument_sqlalchemy(self.engine)
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        import sqlalchemy as sa

        self.exported += len(spans)
        with self.engine.connect() as conn:
            for _span in spans:
                conn.execute(sa.text("SELECT 1"))
        return SpanExportResult.SUCCESS


def test_an_exporter_using_instrumented_code_exports_only_the_applications_spans() -> None:
    exporter = _WritesThroughAnInstrumentedEngine()
    ri.configure(exporter=exporter, logs_exporter="none", metrics_exporter="none")
    try:
        for _ in range(5):
            with ri.stage("retrieval"):
                pass
        for _ in range(3):
            assert ri.force_flush()
        assert exporter.exported == 5
    finally:
        ri.shutdown()
        ri.db.uninstrument_sqlalchemy(exporter.engine)
        exporter.engine.dispose()


def test_an_exporter_returning_failure_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    # Counted in rag.spans.dropped, but no line said so.
    import logging

    class Failing(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.FAILURE

    ri.configure(exporter=Failing(), logs_exporter="none")
    try:
        with caplog.at_level(logging.WARNING, logger="rag_instrument"):
            for batch in range(3):  # batches of different sizes: still one line
                for _ in range(batch + 1):
                    with ri.stage("retrieval"):
                        pass
                assert ri.force_flush() is False
    finally:
        ri.shutdown()
    said = [r.getMessage() for r in caplog.records if "did not export" in r.getMessage()]
    assert len(said) == 1
    assert "Failing" in said[0]


def test_export_masks_event_names_link_attributes_and_bytes_values() -> None:
    with capture() as cap:
        with ri.stage("s") as span:
            span.add_event("called with password=hunter2-x", {"note": "token=abc123def456ghi"})
            span.add_link(trace.get_current_span().get_span_context(), {"password": "pw-1"})
            span.set_attribute("raw", b"password=hunter2-y")
            span.set_attribute("raws", [b"password=hunter2-z", b"fine"])
    (exported,) = cap.spans
    dumped = repr(
        [(e.name, dict(e.attributes or {})) for e in exported.events]
        + [dict(link.attributes or {}) for link in exported.links]
        + [dict(exported.attributes or {})]
    )
    for secret in ("hunter2-x", "abc123def456ghi", "pw-1", "hunter2-y", "hunter2-z"):
        assert secret not in dumped
    assert exported.events[0].name == "called with password=[REDACTED]"
    assert exported.attributes["raw"] == b"password=[REDACTED]"  # bytes still
    assert tuple(exported.attributes["raws"]) == (b"password=[REDACTED]", b"fine")


def test_a_failure_whose_text_changes_is_still_one_warning_per_window(tmp_path: Path) -> None:
    # RELIABILITY C17/I49: one fault, one warning per 20 s, whatever its text says.
    from opentelemetry.sdk.trace import SpanProcessor

    class Broken(SpanProcessor):
        calls = 0

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            Broken.calls += 1
            raise RuntimeError(f"request id {Broken.calls}")

    provider = TracerProvider()
    provider.add_span_processor(Broken())
    log = tmp_path / "a.jsonl"
    ri.configure(exporter="memory", tracer_provider=provider, log_file=str(log))
    for n in range(50):
        with ri.stage(f"doc-{n}"):
            pass
    ri.shutdown()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    warnings = [line for line in lines if "on_start" in line["event"]]
    assert len(warnings) == 1, [w["event"] for w in warnings]
    assert Broken.calls == 50
